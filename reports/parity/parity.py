"""kvbench against kvpress 0.5.5 on the same prompts: kept sets per layer and KV head, and greedy answers.

kvbench's half runs here; kvpress's half (`kvpress_side.py`) runs in its own venv, because kvpress pins
transformers < 5.3. Both load the same GGUF through transformers, see the same token ids (built here from
kvbench's RULER-style generators and split at the question, as `--query after` splits them), compress the
context once, and answer the question on the compressed cache. kvbench runs each method twice: configured
like kvpress (schedule `prompt`, the whole context in one prefill chunk, a ratio budget) and with its own
defaults (512-token chunks, the method's default schedule), so the report separates method from schedule.

    python reports/parity/parity.py --kvpress-python /path/to/kvpress-venv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from kvbench.lmeval.adapter import KVBenchLM
from kvbench.lmeval.tasks import TASK_DIR
from kvbench.policy import Budget, make_policy
from kvbench.runtime import models
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec
from kvbench.tasks import ruler

HERE = Path(__file__).parent
RATIOS = (0.5, 0.75)  # kvpress's compression_ratio: the share of the context's KV pairs removed
TASKS = ("niah_single_2", "niah_multikey_1")
MAX_NEW = 12
# method -> (kvpress press, its arguments; kvbench parameters that define the method alike)
METHODS = {
    "full": ({}, {}),
    "streamingllm": ({"n_sink": 4}, {"sinks": 4}),
    "knorm": ({}, {}),
    "tova": ({}, {}),
    "snapkv": ({"window_size": 64, "kernel_size": 5}, {"window": 64, "kernel": 5, "pooling": "avg"}),
    "pyramidkv": ({"window_size": 64, "kernel_size": 5}, {"window": 64, "kernel": 5, "pooling": "avg"}),
}


def prompts(engine: Engine, per_task: int, length: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("kvbench_task_utils", TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    splitter = KVBenchLM.from_engine(engine, RunSpec.build("full", query="after"), progress=False)
    out = []
    for task in TASKS:
        rows = utils.ruler(task, context_lengths=[length], samples=per_task)["test"]
        for row in rows:
            ids, first = splitter.split(row["prompt"], {"question": row["question"]}, task)
            out.append({"id": f"{task}-{row['sample']}", "context": ids[:first], "question": ids[first:],
                        "answers": row["answers"], "task": task})
    return out


def ratios(method: str) -> tuple[float, ...]:
    return (0.0,) if method == "full" else RATIOS


def kvbench_run(engine: Engine, method: str, ratio: float, params: dict, prompt: dict, like_kvpress: bool) -> dict:
    if method == "full":
        policy = make_policy("full")
    else:
        budget = Budget(ratio=round(1 - ratio, 6))
        policy = make_policy(method, budget, **(params | ({"schedule": "prompt"} if like_kvpress else {})))
    engine.prefill_chunk = 1 << 20 if like_kvpress else 512
    session, _ = engine.compressed_context(prompt["context"], policy)
    kept = [[sorted(h.tolist()) for h in layer.positions[0]] for layer in session.cache.layers]
    logits = session.feed(prompt["question"], query=True)
    answer, logprobs = [], []
    for _ in range(MAX_NEW):
        lp = torch.log_softmax(logits.float(), -1)
        token = int(lp.argmax())
        answer.append(token)
        logprobs.append(float(lp[token]))
        if token in engine.eos_ids:
            break
        _, logits, _ = session.decode_step(token)
    return {"kept": kept, "answer": answer, "logprobs": logprobs}


def jaccard(a: list[list[list[int]]], b: list[list[list[int]]]) -> list[float]:
    """Per (layer, KV head): |A ∩ B| / |A ∪ B| of the kept positions."""
    return [len(set(x) & set(y)) / len(set(x) | set(y)) for la, lb in zip(a, b, strict=True)
            for x, y in zip(la, lb, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvpress-python", required=True, help="python of a venv with kvpress 0.5.5")
    ap.add_argument("--samples", type=int, default=5, help="prompts per task")
    ap.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm, tok = models.load(models.DEFAULT_MODEL)
    engine = Engine(lm, tok)
    items = prompts(engine, args.samples, args.length)
    source = models.resolve(models.DEFAULT_MODEL)
    presses = [{"name": m, "ratio": r, "args": METHODS[m][0], "label": f"{m}@{r}"} for m in METHODS
               for r in ratios(m)]
    with tempfile.TemporaryDirectory() as tmp:
        job, got = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model_dir": str(source.directory), "gguf_file": source.gguf_file,
                                   "prompts": items, "presses": presses, "max_new_tokens": MAX_NEW}))
        subprocess.run([args.kvpress_python, str(HERE / "kvpress_side.py"), str(job), str(got)], check=True)
        theirs = json.loads(got.read_text())
    by_key = {(r["press"], r["prompt"]): r for r in theirs["runs"]}
    rows, records = [], []
    for m, (_, params) in METHODS.items():
        for r in ratios(m):
            for like in (True, False) if m != "full" else (True,):
                js, same, logp, ours_ok, theirs_ok = [], 0, [], 0, 0
                for p in items:
                    ours = kvbench_run(engine, m, r, params if like else {}, p, like)
                    ref = by_key[(f"{m}@{r}", p["id"])]
                    js += jaccard(ours["kept"], ref["kept"])
                    same += ours["answer"] == ref["answer"]
                    if ours["answer"] == ref["answer"]:
                        logp += [abs(a - b) for a, b in zip(ours["logprobs"], ref["logprobs"], strict=True)]
                    ours_ok += ruler.score(tok.decode(ours["answer"]), p["answers"], p["task"])
                    theirs_ok += ruler.score(tok.decode(ref["answer"]), p["answers"], p["task"])
                    records.append({"method": m, "ratio": r, "like_kvpress": like, "prompt": p["id"],
                                    "jaccard": jaccard(ours["kept"], ref["kept"]),
                                    "kvbench_answer": tok.decode(ours["answer"]),
                                    "kvpress_answer": tok.decode(ref["answer"])})
                rows.append([m, r, "kvpress's (prompt, one chunk)" if like else "kvbench defaults",
                             f"{statistics.fmean(js):.4f}", f"{min(js):.3f}", f"{sum(j == 1.0 for j in js)}/{len(js)}",
                             f"{same}/{len(items)}", f"{max(logp):.1e}" if logp else "–",
                             f"{ours_ok:.1f}/{len(items)}", f"{theirs_ok:.1f}/{len(items)}"])
                print(rows[-1], flush=True)
    headers = ["method", "compression", "kvbench configured", "Jaccard mean", "Jaccard min", "pairs identical",
               "same answer", "max |Δ logprob|", "kvbench score", "kvpress score"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    (HERE / "parity.md").write_text(table + "\n")
    (HERE / "parity.json").write_text(json.dumps({"kvpress_versions": theirs["versions"], "rows": records},
                                                 indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
