#!/usr/bin/env bash
# The lm-eval tables of reports/lm-eval/README.md: stock lm-eval 0.4.13 from PyPI, kvbench's model types.
# Small sizes for a 2-core CPU: --metadata shrinks rope_passkey to 2 repeats per distance, the window probes
# and kvbench_ppl to 2 documents, kvbench_multiturn to 1 conversation (24 turns). ~30 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=reports/lm-eval
meta='{"repeats": 2, "documents": 2, "conversations": 1}'
tasks=kvbench_needle,kvbench_rope,kvbench_multiturn,kvbench_ppl
run() {  # name, model, model_args
  .venv/bin/lm_eval --model "$2" --model_args "pretrained=smollm2-135m,$3" --tasks "$tasks" --metadata "$meta" \
    --device cpu --batch_size 1 --output_path "$out/$1" 2>/dev/null | grep '^|' > "$out/$1.md"
}
run full kvbench-hf method=full
run asrkf asrkf-hf tau=0.5
run h2o-256 kvbench-hf method=h2o,budget=256
run streamingllm-256 kvbench-hf method=streamingllm,budget=256
# faithfulness: stock --model hf on the same tasks (multiturn needs a kvbench model type; the window probes
# are longer than the window, which hf would cut)
dir=$(.venv/bin/python -c "from kvbench.runtime import models; print(models.local_dir())")
.venv/bin/lm_eval --model hf --model_args "pretrained=$dir,dtype=float32" --tasks kvbench_needle,kvbench_ppl \
  --metadata "$meta" --device cpu --batch_size 1 --output_path "$out/stock-hf" 2>/dev/null | grep '^|' > "$out/stock-hf.md"
.venv/bin/lm_eval --model kvbench-hf --model_args "pretrained=smollm2-135m,method=full" --tasks kvbench_needle,kvbench_ppl \
  --metadata "$meta" --device cpu --batch_size 1 2>/dev/null | grep '^|' > "$out/kvbench-full-same-tasks.md"
