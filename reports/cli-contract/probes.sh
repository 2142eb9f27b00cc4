#!/usr/bin/env bash
# Every probe of issue 22, run against the installed kvbench: command, exit code, the last line on stderr, and
# what was left on disk. Writes a markdown table to stdout. ~3 minutes on 2 CPU cores (a few probes load the model).
#   bash reports/cli-contract/probes.sh > reports/cli-contract/after.md
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
K="${KVBENCH:-$REPO/.venv/bin/kvbench}"
PY="$(dirname "$K")/python"
W=$(mktemp -d)
cd "$W" || exit 1
printf '| # | probe | command | exit | message (last stderr line) | left on disk |\n|---|---|---|---|---|---|\n'
n=0
row() {  # row NAME CHECK-DIR COMMAND...
  local name=$1 dir=$2; shift 2
  n=$((n + 1))
  "$@" >out.txt 2>err.txt
  local rc=$? msg left
  msg=$(cat err.txt out.txt | tr '\r' '\n' | grep -v '^\s*$' | grep -v '%|' | tail -1 | tr '|' '/' | cut -c1-160)
  left=$(if [ -d "$dir" ]; then (cd "$dir" && find . -mindepth 1 | sort | tr '\n' ' ' | cut -c1-80)
         elif [ -e "$dir" ]; then echo "$dir: unchanged"; else echo "-"; fi)
  printf '| %s | %s | `%s` | %s | %s | %s |\n' "$n" "$name" "$(echo "$*" | sed "s#$K#kvbench#; s#$W/##g" | cut -c1-90)" \
    "$rc" "$msg" "${left:-(empty)}"
}
sweep() { printf 'tasks = ["%s"]\n%s\n[[rows]]\nmethods = ["h2o"]\nbudgets = [64]\n%s\n' "$1" "$2" "$3" > "$4"; }

touch afile; mkdir -p lbdir/leaderboard.md
row "--out is a file" afile "$K" compare --methods full --tasks needle-1k --limit 1 --out afile
row "--out cannot be created (under a file)" afile "$K" compare --methods full --tasks needle-1k --limit 1 --out afile/x
row "--out holds a directory named leaderboard.md" lbdir "$K" compare --methods full --tasks needle-1k --limit 1 --out lbdir
mkdir -p done && echo '[]' > done/results.json
row "--out already has results" done "$K" compare --methods full --tasks needle-1k --limit 1 --out done
row "bench --contexts -5" - "$K" bench --contexts -5 --methods full
row "bench --contexts 0" - "$K" bench --contexts 0 --methods full
sweep needle-1k 'limit = "abc"' '' a.toml;           row "sweep limit = \"abc\"" o "$K" leaderboard --config a.toml --out o --cells c
sweep needle-1k '' 'method_args = { h2o = "x" }' b.toml; row "sweep method_args = {h2o = \"x\"}" o "$K" leaderboard --config b.toml --out o --cells c
sweep needle-1k 'slices = 3' '' s.toml;              row "sweep slices = 3" o "$K" leaderboard --config s.toml --out o --cells c
sweep kvbench_needle 'task_metadata = 5' '' t.toml;  row "sweep task_metadata = 5" o "$K" leaderboard --config t.toml --out o --cells c
sweep kvbench_needle '[task_metadata.kvbench_needle]
context_length = [1024]' '' u.toml;                  row "sweep metadata misspelt (context_length)" o "$K" leaderboard --config u.toml --out o --cells c
sweep kvbench_needle '[task_metadata.kvbench_needle]
context_lengths = [0]' '' v.toml;                    row "sweep context_lengths = [0]" o "$K" leaderboard --config v.toml --out o --cells c
sweep kvbench_needle '[task_metadata.kvbench_needle]
depths = [-3]' '' x.toml;                            row "sweep depths = [-3]" o "$K" leaderboard --config x.toml --out o --cells c
GGUF=$("$PY" -c "from kvbench.runtime import models; s = models.resolve('smollm2-135m'); print(s.directory / s.gguf_file)")
head -c 30000000 "$GGUF" > cut.gguf
row "truncated .gguf" o "$K" compare --model cut.gguf --methods full --tasks needle-1k --limit 1 --out o
mkdir -p noweights && echo '{"model_type": "llama"}' > noweights/config.json
row "HF folder without weights" o "$K" compare --model noweights --methods full --tasks needle-1k --limit 1 --out o
mkdir -p badcfg && echo '{not json' > badcfg/config.json
row "HF folder with a bad config.json" o "$K" compare --model badcfg --methods full --tasks needle-1k --limit 1 --out o
echo hello > notamodel.txt
row "a text file as --model" o "$K" compare --model notamodel.txt --methods full --tasks needle-1k --limit 1 --out o
row "--methods \"\"" o "$K" compare --methods "" --tasks needle-1k --out o
row "--tasks \"\"" o "$K" compare --methods full --tasks "" --out o
row "--device cuda without CUDA" o "$K" compare --device cuda --methods full --tasks needle-1k --limit 1 --out o
row "kvbench methods / head -0" - bash -c "set -o pipefail; '$K' methods | head -0"
row "lm-eval model arg sinks=2.5" - "$(dirname "$K")/lm_eval" --model kvbench-hf --model_args pretrained=smollm2-135m,method=streamingllm,budget=64,sinks=2.5 --tasks kvbench_needle --device cpu --limit 1
echo '{"header": {}, "records": [' > broken.json
row "--check on a corrupt results file" o "$K" leaderboard --config "$REPO/leaderboard/sweep.toml" --slice ci --check broken.json --out o --cells c
mkdir -p outside && row "leaderboard outside the repository" o bash -c "cd outside && '$K' leaderboard --out ../o --cells ../c"
row "kvbench --version" - "$K" --version
row "--check on a bench.json" o "$K" leaderboard --config "$REPO/leaderboard/sweep.toml" --slice ci --check "$REPO/reports/bench/bench.json" --out o --cells c
# Ctrl-C: SIGINT to a run started with the default SIGINT handling (a background job of a script ignores SIGINT)
"$PY" - "$K" > int.txt <<'PYTHON'
import signal
import subprocess
import sys
import time
cmd = [sys.argv[1], "compare", "--methods", "full,streamingllm,h2o,tova", "--budget", "64", "--tasks",
       "needle-1k,needle-2k", "--out", "int"]
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
seen = b""
while b"compare:" not in seen:
    seen += proc.stderr.read1(4096)
time.sleep(2)
proc.send_signal(signal.SIGINT)
err = (seen + proc.stderr.read()).decode()
said = err[err.rfind("kvbench:"):].splitlines()[0] if "kvbench:" in err else "(nothing)"  # after the bar, same line
print(proc.wait(), "|", said.replace("|", "/")[:160])
PYTHON
n=$((n + 1))
printf '| %s | Ctrl-C during a compare | `kvbench compare ... --out int` + SIGINT | %s | %s |\n' "$n" "$(cat int.txt)" \
  "$( (cd int 2>/dev/null && find . -mindepth 1 | sort | tr '\n' ' ') || echo -)"
rm -rf "$W"
