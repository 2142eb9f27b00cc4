"""`kvbench compare`: every method on the same model and the same samples, one record per (method, budget)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvbench import models
from kvbench.cache import POSITION_MODES
from kvbench.engine import Engine, RunResult
from kvbench.leaderboard import markdown
from kvbench.policy import Budget, KVPolicy, make_policy, policy_class
from kvbench.records import dump_json, sample_record, summarize, versions, write_atomic
from kvbench.tasks import Task, make_task


@dataclass
class CompareSpec:
    methods: list[str]
    budgets: list[Budget]
    tasks: list[str]
    model: str = models.DEFAULT_MODEL
    limit: int | None = None
    prefill_chunk: int = 512
    method_args: dict[str, dict[str, str]] = field(default_factory=dict)
    device: str = "cpu"
    context_lengths: tuple[int, ...] | None = None  # overrides the needle tasks' lengths
    positions: list[str] = field(default_factory=lambda: ["original"])


def parse_method_args(items: list[str]) -> dict[str, dict[str, str]]:
    """['asrkf:tau=0.5,window=32', 'h2o:heavy_ratio=0.3'] -> {'asrkf': {'tau': '0.5', ...}, ...}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or not method or not rest:
            raise ValueError(f"--method-args {item!r} must look like METHOD:key=value[,key=value...]")
        for pair in rest.split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--method-args {item!r}: {pair!r} is not key=value")
            out.setdefault(method.strip(), {})[key.strip()] = value.strip()
    return out


def plan(spec: CompareSpec) -> list[tuple[KVPolicy, str]]:
    """Every (policy, position mode) to run, validated before anything expensive happens."""
    stray = sorted(set(spec.method_args) - set(spec.methods))
    if stray:
        raise ValueError(f"--method-args names {', '.join(stray)}, which is not among --methods")
    bad = [p for p in spec.positions if p not in POSITION_MODES]
    if bad or not spec.positions:
        raise ValueError(f"--positions {','.join(bad)!r} is not a position mode; allowed: {', '.join(POSITION_MODES)}")
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"--limit must be a positive number of samples, got {spec.limit}")
    policies = []
    for name in dict.fromkeys(spec.methods):
        budgets: list[Budget | None] = [None]
        if policy_class(name).uses_budget:
            if not spec.budgets:
                raise ValueError(f"method {name!r} needs --budget")
            budgets = list(spec.budgets)
        cls = policy_class(name)
        modes = ["original"] if not cls.evicts else spec.positions
        if "rerotate" in modes and not cls.uniform_layers:
            raise ValueError(f"--positions rerotate needs the same token count in every layer; {name!r} keeps "
                             "per-layer sets of different sizes (use original or naive)")
        for params in expand_sweep(spec.method_args.get(name, {})):
            policies.extend((make_policy(name, b, **params), m) for b in budgets for m in modes)
    return policies


def expand_sweep(params: dict[str, str]) -> list[dict[str, str]]:
    """{'tau': '0.25|0.5', 'k': '1'} -> [{'tau': '0.25', 'k': '1'}, {'tau': '0.5', 'k': '1'}]."""
    keys = list(params)
    choices = [params[k].split("|") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


def run(spec: CompareSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    policies = plan(spec)
    explicit = {name: set(spec.method_args.get(name, {})) for name in spec.methods}
    overrides = {"context_lengths": spec.context_lengths} if spec.context_lengths else {}
    tasks: list[Task] = [make_task(t, **overrides) for t in dict.fromkeys(spec.tasks)]
    models.resolve(spec.model)  # fail fast on a missing model, before loading anything

    lm, tok = models.load(spec.model, device=spec.device)
    engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
    work = [(task, s) for task in tasks for s in task.samples(engine, spec.limit)]
    for task, s in work:
        engine.check_fits(len(s.prompt_ids), task.max_new_tokens)
    engine.generate(engine.encode_chat("Hello"), make_policy("full"), max_new_tokens=4)  # warm-up

    config = {"model": spec.model, "device": spec.device, "attention": engine.attention_backend,
              "prefill_chunk": spec.prefill_chunk, "limit": spec.limit}
    env = versions()
    records = []
    bar = tqdm(total=len(policies) * len(work), disable=not progress, desc="compare", unit="run")
    for policy, mode in policies:
        bar.set_postfix_str(f"{policy.name} {policy.budget or ''} {mode}")
        samples = []
        for task, s in work:
            result = run_sample(engine, task, s, policy, mode)
            samples.append(sample_record(task.name, s, result, task.score(result.text, s)))
            bar.update()
        config_now = policy.config()
        records.append({
            "method": policy.name,
            "variant": ",".join(f"{k}={config_now[k]}" for k in sorted(explicit.get(policy.name, ()))),
            "budget": str(policy.budget) if policy.budget is not None else None,
            "positions": mode,
            "config": {**config, "positions": mode, "policy": config_now},
            "versions": env,
            "metrics": summarize(samples),
            "samples": samples,
        })
    bar.close()
    if out_dir is not None:
        write_outputs(records, out_dir)
    return records


def run_sample(engine: Engine, task: Task, sample, policy: KVPolicy, mode: str) -> RunResult:
    """One sample: a prompt and its answer, or a whole conversation on one cache (turns in meta)."""
    turns = sample.meta.get("turns")
    if not turns:
        return engine.generate(sample.prompt_ids, policy, task.max_new_tokens, task.stop,
                               ignore_eos=task.ignore_eos, positions=mode)
    results = engine.converse(turns, policy, task.max_new_tokens, task.stop, positions=mode)
    return dataclasses.replace(
        results[-1],
        prompt_tokens=sum(r.prompt_tokens for r in results),
        tokens=[t for r in results for t in r.tokens],
        text="|".join(r.text.replace("|", " ") for r in results),
        prefill_s=sum(r.prefill_s for r in results),
        decode_s=[d for r in results for d in r.decode_s],
        memory_peak_bytes=max(r.memory_peak_bytes for r in results),
    )


def write_outputs(records: list[dict[str, Any]], out_dir: Path) -> None:
    """results.json and leaderboard.md, each written whole or not at all."""
    write_atomic(out_dir / "results.json", dump_json(records))
    write_atomic(out_dir / "leaderboard.md", markdown(records, "kvbench compare"))


def default_out_dir(methods: list[str]) -> Path:
    return Path("reports") / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(methods)}"
