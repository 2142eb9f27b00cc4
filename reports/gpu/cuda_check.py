"""Issue 21's CUDA checks in one short run (reports/gpu/README.md, "The next GPU session"): for `full`, an evicting
method and ASR-KF-EGR (its defaults, and kvbench's query-driven thaw) on the bundled model, per decode step:
- the host synchronisations (torch.cuda.set_sync_debug_mode: every synchronising call warns; counted per call site;
  the step's own greedy `argmax` to the host is one of them for every method);
- where the frozen rows live (pinned host memory expected) and how many tokens are frozen;
- decode ms per step, timed in a second pass without the synchronisation check, and its ratio to `full`'s.
It runs on a CPU too (no synchronisation count there), so it is tried before a GPU is lent:
    python reports/gpu/cuda_check.py --model PATH.gguf --device cuda --dtype bfloat16 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections import Counter
from pathlib import Path

import torch
from tabulate import tabulate

from kvbench.evaluation.bench import prompt
from kvbench.evaluation.records import versions
from kvbench.policy import make_policy
from kvbench.runtime import models
from kvbench.runtime.engine import Engine

VARIANTS = {  # label: (method, budget, parameters)
    "full": ("full", None, {}),
    "streamingllm 512": ("streamingllm", "512", {}),
    "asrkf": ("asrkf", None, {}),
    "asrkf query-thaw": ("asrkf", None, {"query_thaw": "0.02", "thaw_on_prompt": "true", "k": "0.25"}),
}


def decode(engine: Engine, ids: list[int], label: str, steps: int, count_syncs: bool) -> dict:
    """Prefill `ids`, then `steps` greedy decode steps; the steps' seconds and, when asked, their synchronisations."""
    method, budget, params = VARIANTS[label]
    session = engine.session(make_policy(method, budget, **params))
    with torch.inference_mode():
        logits, _ = session.timed_feed(ids)
        token, seconds, sites = int(logits.argmax()), [], Counter()
        for _ in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if count_syncs:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    token, _, s = session.decode_step(token)
                finally:
                    if count_syncs:
                        torch.cuda.set_sync_debug_mode("default")
            seconds.append(s)
            sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                         if "synchronizing" in str(w.message).lower())
    frozen = [layer.frozen for layer in session.cache.layers if layer.frozen.k is not None]
    return {"ms": [1000 * s for s in seconds], "syncs_per_step": sum(sites.values()) / steps,
            "sync_sites": dict(sites.most_common(8)),
            "frozen_tokens": sum(layer.frozen.n for layer in session.cache.layers),
            "frozen_pinned": all(f.k.is_pinned() for f in frozen) if frozen else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lm, tok = models.load(args.model, device=args.device, dtype=models.parse_dtype(args.dtype))
    engine = Engine(lm, tok)
    ids = prompt(engine, args.context)
    cuda = engine.device.type == "cuda"
    decode(engine, ids[:64], "full", 4, False)  # warm-up
    rows = {label: decode(engine, ids, label, args.steps, cuda) for label in VARIANTS}
    timed = {label: decode(engine, ids, label, args.steps, False)["ms"] for label in VARIANTS}
    base = statistics.median(timed["full"])
    table = [[label, f"{r['syncs_per_step']:.1f}" if cuda else "–", ", ".join(f"{k} ×{v}" for k, v in
              r["sync_sites"].items()) or "–", r["frozen_tokens"], r["frozen_pinned"],
              f"{statistics.median(timed[label]):.2f}", f"{statistics.median(timed[label]) / base:.2f}"]
             for label, r in rows.items()]
    device = torch.cuda.get_device_name(engine.device) if cuda else "cpu"
    head = (f"{device} · {args.dtype} · context {args.context} · {args.steps} decode steps · "
            f"torch {torch.__version__} · transformers {versions().get('transformers')}\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_check.md").write_text(head + tabulate(table, headers=[
        "variant", "syncs/step", "sync call sites (steps together)", "frozen tokens at the end", "frozen pinned",
        "decode ms p50", "× full"], tablefmt="github") + "\n")
    (args.out / "cuda_check.json").write_text(json.dumps(
        {"device": device, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "timed_ms": timed},
        indent=1))
    print((args.out / "cuda_check.md").read_text())


if __name__ == "__main__":
    main()
