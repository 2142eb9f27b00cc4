#!/usr/bin/env bash
# The leaderboard of record's speed comparison (leaderboard/RECORD.md): the record's cells were timed on two
# machines, two at a time, so its decode × full mostly reads –; here every row's method runs at the record's
# setting, one model at a time, on a quiet machine. Each run holds its own `full`, so × full compares within a run.
# Run from the checkout's root after `make setup`: bash reports/bench/record/run.sh (about 40 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../../.."
bench() { OMP_NUM_THREADS=2 .venv/bin/kvbench bench --contexts 2048,4096 --new-tokens 32 --repeats 3 --no-progress \
            --overwrite "$@"; }
for model in smollm2-135m gemma3-270m; do
  out=reports/bench/record/$model
  bench --model "$model" --budget 0.5 --out "$out/half" \
    --methods full,streamingllm,h2o,tova,snapkv,pyramidkv,knorm,gist,kvzip,attentiontop,lethe,asrkf
  bench --model "$model" --methods full,asrkf --out "$out/asrkf-retrieval-safe" \
    --method-args asrkf:k=0.25,query_thaw=0.02,thaw_on_prompt=true
  bench --model "$model" --methods full,asrkf --out "$out/asrkf-lean" \
    --method-args asrkf:k=0.25,query_thaw=0.02,recovery=false
  bench --model "$model" --budget 0.16 --methods full,snapkv,streamingllm --kv-quant none,int8,int4 \
    --out "$out/int4-bytes"
done
