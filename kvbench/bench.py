"""`kvbench bench`: per-token decode time, prefill time and peak KV of each method against `full`,
at several context lengths, in one run. Figures are ratios to `full` measured in the same process
(timings are not asserted anywhere: shared machines are noisy).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from kvbench import models
from kvbench.compare import expand_sweep
from kvbench.engine import Engine
from kvbench.policy import make_policy, policy_class
from kvbench.records import MIB, dump_json, versions, write_atomic
from kvbench.tasks.multiturn import passages


@dataclass
class BenchSpec:
    methods: list[str]
    contexts: list[int]
    method_args: dict[str, dict[str, str]] = field(default_factory=dict)  # '|' separates variants
    budget: str = "512"
    new_tokens: int = 32
    model: str = models.DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    prefill_chunk: int = 512
    batch: tuple[int, ...] = (1,)  # batch sizes; B > 1 decodes B different prompts together


def prompt(engine: Engine, length: int, index: int = 0) -> list[int]:
    """`length` tokens of real prose (pydoc topics), the same for every method; `index` picks another span."""
    text = " ".join(passages(400))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    start = index * 1009
    if len(ids) < start + length:
        raise ValueError(f"bench context {length} is longer than the {len(ids) - start} tokens of text available")
    return ids[start : start + length]


def run(spec: BenchSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    variants = [(name, params) for name in spec.methods for params in expand_sweep(spec.method_args.get(name, {}))]
    stray = sorted(set(spec.method_args) - set(spec.methods))
    if stray:
        raise ValueError(f"--method-args names {', '.join(stray)}, which is not among --methods")
    for name, params in variants:
        make_policy(name, spec.budget if policy_class(name).uses_budget else None, **params)  # fail before loading
    dtype = getattr(torch, spec.dtype)
    lm, tok = models.load(spec.model, device=spec.device, dtype=dtype)
    engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
    for n in spec.contexts:
        engine.check_fits(n, spec.new_tokens)
    engine.generate(prompt(engine, 64), make_policy("full"), max_new_tokens=4)  # warm-up
    rows = []
    if any(b < 1 for b in spec.batch):
        raise ValueError(f"batch sizes must be >= 1, got {list(spec.batch)}")
    bar = tqdm(total=len(spec.contexts) * len(variants) * len(spec.batch), disable=not progress, desc="bench")
    for n, batch in ((n, b) for n in spec.contexts for b in spec.batch):
        prompts = [prompt(engine, n, i) for i in range(batch)]
        for name, params in variants:
            budget = spec.budget if policy_class(name).uses_budget else None
            policy = make_policy(name, budget, **params)
            if batch == 1:
                r = engine.generate(prompts[0], policy, spec.new_tokens, ignore_eos=True)
            else:
                r = engine.generate_batch(prompts, policy, spec.new_tokens, ignore_eos=True)[0]
            c = r.cache
            step_ms = 1e3 * statistics.median(r.decode_s)
            variant = ",".join(f"{k}={v}" for k, v in params.items())
            rows.append({"method": name, "variant": variant, "budget": budget, "context": n, "batch": batch,
                         "tokens_per_s": 1e3 * batch / step_ms,
                         "decode_ms_p50": step_ms,
                         "decode_ms_mean": 1e3 * statistics.fmean(r.decode_s),
                         "prefill_ms": 1e3 * r.prefill_s, "peak_kv_bytes": c.peak_active_bytes,
                         "active_kv_bytes": c.active_bytes, "full_kv_bytes": c.full_bytes,
                         # peak active KV in tokens per layer, against the bound budget + one prefill chunk
                         "peak_kv_tokens_per_layer": c.peak_active_bytes * c.seen_tokens / c.full_bytes,
                         "peak_bound_tokens": int(budget) + spec.prefill_chunk if budget and budget.isdigit()
                         else None,
                         "memory_peak_bytes": r.memory_peak_bytes,
                         "transfer_ms": 1e3 * (c.offload.seconds + c.restore.seconds)})
            bar.update()
    bar.close()
    for row in rows:
        same = [b for b in rows if b["context"] == row["context"] and b["batch"] == row["batch"]]
        base = next((b for b in same if b["method"] == "full"), None)
        single = next(b for b in rows if b["context"] == row["context"] and b["method"] == row["method"]
                      and b["variant"] == row["variant"] and b["batch"] == spec.batch[0])
        row["decode_vs_full"] = row["decode_ms_p50"] / base["decode_ms_p50"] if base else None
        row["prefill_vs_full"] = row["prefill_ms"] / base["prefill_ms"] if base else None
        row["throughput_vs_first_batch"] = row["tokens_per_s"] / single["tokens_per_s"]
    record = {"spec": vars(spec), "versions": versions(), "attention": engine.attention_backend, "rows": rows}
    if out_dir is not None:
        write_atomic(out_dir / "bench.json", dump_json([record]))
        write_atomic(out_dir / "bench.md", markdown(record))
    return rows


def markdown(record: dict[str, Any]) -> str:
    def ratio(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    first = record["spec"]["batch"][0]
    headers = ["context", "batch", "method", "budget", "decode ms/step p50", "decode × full", "tok/s",
               f"tok/s × batch {first}", "prefill ms", "prefill × full", "peak KV MiB", "peak KV tok/layer",
               "budget + chunk", "final active KV MiB", "transfer ms"]
    table = [[r["context"], r["batch"], f"{r['method']} {r.get('variant', '')}".strip(),
              r["budget"] or "all", f"{r['decode_ms_p50']:.1f}",
              ratio(r["decode_vs_full"]), f"{r['tokens_per_s']:.1f}", ratio(r["throughput_vs_first_batch"]),
              f"{r['prefill_ms']:.0f}", ratio(r["prefill_vs_full"]), f"{r['peak_kv_bytes'] / MIB:.1f}",
              f"{r['peak_kv_tokens_per_layer']:.0f}", r["peak_bound_tokens"] or "–",
              f"{r['active_kv_bytes'] / MIB:.1f}", f"{r['transfer_ms']:.0f}"] for r in record["rows"]]
    v, s = record["versions"], record["spec"]
    head = (f"Model `{s['model']}` {s['dtype']} on {v.get('device')} · attention `{record['attention']}` · "
            f"{s['new_tokens']} new tokens · prefill chunk {s['prefill_chunk']} · torch {v.get('torch')} · "
            f"transformers {v.get('transformers')}")
    return head + "\n\n" + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
