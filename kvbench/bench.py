"""`kvbench bench`: per-token decode time, prefill time and peak KV of each method against `full`,
at several context lengths, in one run. Figures are ratios to `full` measured in the same process
(timings are not asserted anywhere: shared machines are noisy).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from kvbench import models
from kvbench.engine import Engine
from kvbench.policy import make_policy, policy_class
from kvbench.records import MIB, dump_json, versions, write_atomic
from kvbench.tasks.multiturn import passages


@dataclass
class BenchSpec:
    methods: list[str]
    contexts: list[int]
    budget: str = "512"
    new_tokens: int = 32
    model: str = models.DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    prefill_chunk: int = 512


def prompt(engine: Engine, length: int) -> list[int]:
    """`length` tokens of real prose (pydoc topics), the same for every method."""
    text = " ".join(passages(400))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"bench context {length} is longer than the {len(ids)} tokens of text available")
    return ids[:length]


def run(spec: BenchSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    for name in spec.methods:
        policy_class(name)
    dtype = getattr(torch, spec.dtype)
    lm, tok = models.load(spec.model, device=spec.device, dtype=dtype)
    engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
    for n in spec.contexts:
        engine.check_fits(n, spec.new_tokens)
    engine.generate(prompt(engine, 64), make_policy("full"), max_new_tokens=4)  # warm-up
    rows = []
    bar = tqdm(total=len(spec.contexts) * len(spec.methods), disable=not progress, desc="bench")
    for n in spec.contexts:
        ids = prompt(engine, n)
        for name in spec.methods:
            budget = spec.budget if policy_class(name).uses_budget else None
            r = engine.generate(ids, make_policy(name, budget), spec.new_tokens, ignore_eos=True)
            c = r.cache
            rows.append({"method": name, "budget": budget, "context": n,
                         "decode_ms_p50": 1e3 * statistics.median(r.decode_s),
                         "decode_ms_mean": 1e3 * statistics.fmean(r.decode_s),
                         "prefill_ms": 1e3 * r.prefill_s, "peak_kv_bytes": c.peak_active_bytes,
                         "active_kv_bytes": c.active_bytes, "full_kv_bytes": c.full_bytes,
                         "memory_peak_bytes": r.memory_peak_bytes,
                         "transfer_ms": 1e3 * (c.offload.seconds + c.restore.seconds)})
            bar.update()
    bar.close()
    for row in rows:
        base = next(b for b in rows if b["method"] == "full" and b["context"] == row["context"])
        row["decode_vs_full"] = row["decode_ms_p50"] / base["decode_ms_p50"]
        row["prefill_vs_full"] = row["prefill_ms"] / base["prefill_ms"]
    record = {"spec": vars(spec), "versions": versions(), "attention": engine.attention_backend, "rows": rows}
    if out_dir is not None:
        write_atomic(out_dir / "bench.json", dump_json([record]))
        write_atomic(out_dir / "bench.md", markdown(record))
    return rows


def markdown(record: dict[str, Any]) -> str:
    headers = ["context", "method", "budget", "decode ms p50", "decode × full", "prefill ms", "prefill × full",
               "peak KV MiB", "final active KV MiB", "transfer ms"]
    table = [[r["context"], r["method"], r["budget"] or "all", f"{r['decode_ms_p50']:.1f}",
              f"{r['decode_vs_full']:.2f}", f"{r['prefill_ms']:.0f}", f"{r['prefill_vs_full']:.2f}",
              f"{r['peak_kv_bytes'] / MIB:.1f}", f"{r['active_kv_bytes'] / MIB:.1f}", f"{r['transfer_ms']:.0f}"]
             for r in record["rows"]]
    v, s = record["versions"], record["spec"]
    head = (f"Model `{s['model']}` {s['dtype']} on {v.get('device')} · attention `{record['attention']}` · "
            f"{s['new_tokens']} new tokens · prefill chunk {s['prefill_chunk']} · torch {v.get('torch')} · "
            f"transformers {v.get('transformers')}")
    return head + "\n\n" + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
