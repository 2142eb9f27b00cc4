"""`kvbench bench`: per-token decode time, prefill time and peak KV of each method against `full`,
at several context lengths, in one run. Figures are ratios to `full` measured in the same process
(timings are not asserted anywhere: shared machines are noisy, ±20% between two runs of the same
code a minute apart on the 2-core CI machine). Two defences, both in `_round`: at batch 1 every
method decodes in lockstep with the others, and `repeats` > 1 runs whole rounds again; a ratio is
the median over rounds of that round's ratio to `full`, and its spread (lowest, highest) is kept.
The process-wide allocator peak is not reported here (methods share the process); `kvbench compare`
runs one method at a time and reports it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate
from tqdm.auto import tqdm

from kvbench.evaluation import results
from kvbench.evaluation.compare import expand_sweep
from kvbench.evaluation.records import MIB, versions
from kvbench.files import write_with_derived
from kvbench.policy import Budget, make_policy
from kvbench.runtime import models
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.decode import Decoding, decode
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec
from kvbench.runtime.session import RunResult
from kvbench.tasks.prose import passages

Variant = tuple[str, dict[str, str], str]  # method, its parameters, kv_quant


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
    repeats: int = 1  # interleaved rounds per context and batch size
    kv_quants: list[str] = field(default_factory=lambda: ["none"])  # every method on each storage; full "none": 1.0


def prompt(engine: Engine, length: int, index: int = 0) -> list[int]:
    """`length` tokens of real prose (pydoc topics), the same for every method; `index` picks another span."""
    text = " ".join(passages(400))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    start = index * 1009
    if len(ids) < start + length:
        raise ValueError(f"bench context {length} is longer than the {len(ids) - start} tokens of text available")
    return ids[start : start + length]


def run_bench(spec: BenchSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    if any(b < 1 for b in spec.batch):
        raise ValueError(f"batch sizes must be >= 1, got {list(spec.batch)}")
    if spec.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {spec.repeats}")
    if not spec.methods:
        raise ValueError("--methods names no method")
    if not spec.contexts or any(n < 1 for n in spec.contexts):
        raise ValueError(f"--contexts must be positive token counts (e.g. 1024,4096), got {spec.contexts}")
    if spec.new_tokens < 2:
        raise ValueError(f"new tokens must be >= 2 (the first comes from prefill; decode is timed after it), "
                         f"got {spec.new_tokens}")
    variants = [(name, params, quant) for name in spec.methods
                for params in expand_sweep(spec.method_args.get(name, {})) for quant in dict.fromkeys(spec.kv_quants)]
    stray = sorted(set(spec.method_args) - set(spec.methods))
    if stray:
        raise ValueError(f"--method-args names {', '.join(stray)}, which is not among --methods")
    for variant in variants:
        _run(*variant, spec)  # fail before loading
    lm, tok = models.load(spec.model, device=spec.device, dtype=models.parse_dtype(spec.dtype))
    engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
    for n in spec.contexts:
        engine.check_fits(n, spec.new_tokens)
    engine.generate(prompt(engine, 64), make_policy("full"), max_new_tokens=4)  # warm-up
    rows = []
    bar = tqdm(total=len(spec.contexts) * len(variants) * len(spec.batch) * spec.repeats, disable=not progress,
               desc="bench")
    for n, batch in ((n, b) for n in spec.contexts for b in spec.batch):
        prompts = [prompt(engine, n, i) for i in range(batch)]
        rounds = [_round(engine, prompts, variants, spec, bar) for _ in range(spec.repeats)]
        rows += [_summarise(variant, n, batch, [r[i] for r in rounds], [_full(variants, r) for r in rounds])
                 for i, variant in enumerate(variants)]
    bar.close()
    for row in rows:
        single = next(b for b in rows if b["context"] == row["context"] and b["method"] == row["method"]
                      and b["variant"] == row["variant"] and b.get("kv_quant") == row.get("kv_quant")
                      and b["batch"] == spec.batch[0])
        row["throughput_vs_first_batch"] = row["tokens_per_s"] / single["tokens_per_s"]
    run_ = {**vars(spec), "budget": Budget.parse(spec.budget).to_json(), "versions": versions(),
            "attention": engine.attention_backend, "model_sha256": models.content_digest(spec.model)}
    if out_dir is not None:
        write_with_derived(out_dir / "bench.json", results.dumps("bench", run_, rows),
                           {out_dir / "bench.md": markdown(run_, rows)})
    return rows


def _round(engine: Engine, prompts: list[list[int]], variants: list[Variant], spec: BenchSpec,
           bar: tqdm) -> list[dict[str, Any]]:
    """One run of every variant. At batch 1 the prompts are prefilled one method after another, then all methods
    decode in lockstep (step i of each before step i + 1 of any), so a slow spell of the machine lands on every
    method alike instead of on whichever ran then. Batch > 1 runs one method after another."""
    specs = [_run(*variant, spec) for variant in variants]
    policies = [run.policy for run in specs]
    if len(prompts) > 1:
        outcomes = []
        for run in specs:
            outcomes.append(generate_batch(engine, prompts, run.policy, spec.new_tokens, ignore_eos=True,
                                           kv_quant=run.kv_quant))
            bar.update()
    else:
        runs = []
        for run in specs:
            session = engine.session(run.policy, kv_quant=run.kv_quant)
            logits, prefill_s = session.timed_feed(prompts[0])
            runs.append((Decoding(session, logits, spec.new_tokens, ignore_eos=True), prefill_s))
        replies = decode([d for d, _ in runs])
        outcomes = [[d.session.result(len(prompts[0]), prefill_s, reply)]
                    for (d, prefill_s), reply in zip(runs, replies, strict=True)]
        bar.update(len(runs))
    return [_figures(r, policy.budget, spec) for r, policy in zip(outcomes, policies, strict=True)]


def _run(name: str, params: dict[str, str], kv_quant: str, spec: BenchSpec) -> RunSpec:
    """A method's run in the bench: the bench's budget where the method takes one."""
    return RunSpec.build(name, spec.budget if RunSpec.takes_budget(name) else None, params, kv_quant=kv_quant)


def _figures(batch: list[RunResult], budget: Budget | None, spec: BenchSpec) -> dict[str, Any]:
    """One method's run (its sequences, decoded together): decode step time (median over the steps, and over the
    last quarter of them: a policy whose work changes as generation goes on, like ASR-KF-EGR's freeze cohorts,
    shows it there), the policy's share of a step, prefill time and the first sequence's cache sizes."""
    r = batch[0]
    c = r.cache
    return {"budget": budget.to_json() if budget else None, "step_ms": 1e3 * statistics.median(r.decode_s),
            "late_ms": 1e3 * statistics.median(r.decode_s[len(r.decode_s) * 3 // 4 :]),
            "mean_ms": 1e3 * statistics.fmean(r.decode_s), "prefill_ms": 1e3 * r.prefill_s,
            "peak_kv_bytes": c.peak_active_bytes, "active_kv_bytes": c.active_bytes, "full_kv_bytes": c.full_bytes,
            # active KV over the whole run, not just at its end: a cache that regrows (ASR-KF-EGR's recovery
            # thaws) or shrinks slowly (AttentionTop) reads more KV per step than its final size says
            "mean_kv_compression": c.mean_kv_compression, "policy": r.policy_report,
            # peak active KV in tokens per layer, against the bound budget + one prefill chunk
            "peak_kv_tokens_per_layer": c.peak_active_bytes / c.token_bytes,
            "peak_bound_tokens": budget.tokens + spec.prefill_chunk if budget and budget.tokens else None,
            "transfer_ms": 1e3 * (c.offload.seconds + c.restore.seconds),
            # what deciding and applying decisions adds to each decode step (every sequence's policy runs in it):
            # set against the step time, it shows whether a smaller attention pays for the bookkeeping
            "policy_ms": 1e3 * sum(x.cache.policy_seconds["decode"] for x in batch) / len(r.decode_s)}


def _full(variants: list[Variant], round_: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`full`'s run in the model's dtype: what every ratio is against."""
    return next((m for (name, _, quant), m in zip(variants, round_, strict=True) if name == "full" and quant == "none"),
                None)


def _summarise(variant: Variant, n: int, batch: int, runs: list[dict[str, Any]],
               fulls: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One row from a method's runs (one per round) and `full`'s runs of the same rounds."""
    name, params, quant = variant
    med = statistics.median
    step_ms = med(r["step_ms"] for r in runs)
    last = runs[-1]  # sizes and peaks are the same in every round
    row = {"method": name, "variant": ",".join(f"{k}={v}" for k, v in params.items()), "budget": last["budget"],
           "context": n, "batch": batch, "rounds": len(runs), "tokens_per_s": 1e3 * batch / step_ms,
           "decode_ms_p50": step_ms, "decode_ms_mean": med(r["mean_ms"] for r in runs),
           "decode_ms_rounds": [r["step_ms"] for r in runs], "late_decode_ms_p50": med(r["late_ms"] for r in runs),
           "prefill_ms": med(r["prefill_ms"] for r in runs),
           **{k: last[k] for k in ("peak_kv_bytes", "active_kv_bytes", "full_kv_bytes", "peak_kv_tokens_per_layer",
                                   "peak_bound_tokens", "transfer_ms", "mean_kv_compression", "policy")},
           "policy_ms_per_step": med(r["policy_ms"] for r in runs), **({"kv_quant": quant} if quant != "none" else {})}
    for key, col in (("step_ms", "decode"), ("late_ms", "late_decode"), ("prefill_ms", "prefill")):
        ratios = [r[key] / f[key] for r, f in zip(runs, fulls, strict=True) if f is not None]
        row[f"{col}_vs_full"] = med(ratios) if ratios else None
        row[f"{col}_vs_full_range"] = [min(ratios), max(ratios)] if ratios else None
    return row


def markdown(run_: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    def ratio(x: float | None, spread: list[float] | None = None) -> str:
        if x is None:
            return "–"
        return f"{x:.2f}" if not spread or spread[0] == spread[1] else f"{x:.2f} ({spread[0]:.2f}–{spread[1]:.2f})"

    first = run_["batch"][0]
    headers = ["context", "batch", "method", "budget", "decode ms/step p50", "decode × full",
               "last quarter × full", "tok/s",
               f"tok/s × batch {first}", "prefill ms", "prefill × full", "peak KV MiB", "peak KV tok/layer",
               "budget + chunk", "final active KV MiB", "mean KV comp.", "policy ms/step", "transfer ms"]
    table = [[r["context"], r["batch"], " ".join(filter(None, (r["method"], r.get("variant"), r.get("kv_quant")))),
              Budget.label(r["budget"]), f"{r['decode_ms_p50']:.1f}",
              ratio(r["decode_vs_full"], r.get("decode_vs_full_range")),
              ratio(r.get("late_decode_vs_full"), r.get("late_decode_vs_full_range")), f"{r['tokens_per_s']:.1f}",
              ratio(r["throughput_vs_first_batch"]), f"{r['prefill_ms']:.0f}",
              ratio(r["prefill_vs_full"], r.get("prefill_vs_full_range")), f"{r['peak_kv_bytes'] / MIB:.1f}",
              f"{r['peak_kv_tokens_per_layer']:.0f}", r["peak_bound_tokens"] or "–",
              f"{r['active_kv_bytes'] / MIB:.1f}", f"{r['mean_kv_compression']:.3f}",
              f"{r['policy_ms_per_step']:.1f}", f"{r['transfer_ms']:.0f}"] for r in rows]
    v, s = run_["versions"], run_
    cpu = f" ({v['cpu']})" if "cpu" in v and s["device"] == "cpu" else ""
    head = (f"Model `{s['model']}` {s['dtype']} on {v.get('device')}{cpu} · attention `{s['attention']}` · "
            f"{s['new_tokens']} new tokens · prefill chunk {s['prefill_chunk']} · torch {v.get('torch')} · "
            f"transformers {v.get('transformers')}")
    rounds = s.get("repeats", 1)
    if rounds > 1:
        head += (f"\n\nEach figure: median of {rounds} interleaved rounds (every method once per round); "
                 "ratios × full: median of the rounds' ratios (lowest–highest).")
    return head + "\n\n" + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
