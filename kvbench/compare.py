"""`kvbench compare`: every method on the same model and the same samples, one record per (method, budget)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvbench import models
from kvbench.engine import Engine
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


def plan(spec: CompareSpec) -> list[KVPolicy]:
    """Every policy to run, validated before anything expensive happens."""
    stray = sorted(set(spec.method_args) - set(spec.methods))
    if stray:
        raise ValueError(f"--method-args names {', '.join(stray)}, which is not among --methods")
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"--limit must be a positive number of samples, got {spec.limit}")
    policies = []
    for name in dict.fromkeys(spec.methods):
        params = spec.method_args.get(name, {})
        if not policy_class(name).uses_budget:
            policies.append(make_policy(name, **params))
            continue
        if not spec.budgets:
            raise ValueError(f"method {name!r} needs --budget")
        policies.extend(make_policy(name, b, **params) for b in spec.budgets)
    return policies


def run(spec: CompareSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    policies = plan(spec)
    overrides = {"context_lengths": spec.context_lengths} if spec.context_lengths else {}
    tasks: list[Task] = [make_task(t, **overrides) for t in dict.fromkeys(spec.tasks)]
    models.resolve(spec.model)  # fail fast on a missing model, before loading anything

    lm, tok = models.load(spec.model, device=spec.device)
    engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
    work = [(task, s) for task in tasks for s in task.samples(engine, spec.limit)]
    for task, s in work:
        engine.check_fits(len(s.prompt_ids), task.max_new_tokens)
    engine.generate(work[0][1].prompt_ids[:64], make_policy("full"), max_new_tokens=4)  # warm-up

    config = {"model": spec.model, "device": spec.device, "attention": engine.attention_backend,
              "prefill_chunk": spec.prefill_chunk, "positions": "original", "limit": spec.limit}
    env = versions()
    records = []
    bar = tqdm(total=len(policies) * len(work), disable=not progress, desc="compare", unit="run")
    for policy in policies:
        bar.set_postfix_str(f"{policy.name} {policy.budget or ''}")
        samples = []
        for task, s in work:
            result = engine.generate(s.prompt_ids, policy, task.max_new_tokens, task.stop)
            samples.append(sample_record(task.name, s, result, task.score(result.text, s)))
            bar.update()
        records.append({
            "method": policy.name,
            "budget": str(policy.budget) if policy.budget is not None else None,
            "config": {**config, "policy": policy.config()},
            "versions": env,
            "metrics": summarize(samples),
            "samples": samples,
        })
    bar.close()
    if out_dir is not None:
        write_outputs(records, out_dir)
    return records


def write_outputs(records: list[dict[str, Any]], out_dir: Path) -> None:
    """results.json and leaderboard.md, each written whole or not at all."""
    write_atomic(out_dir / "results.json", dump_json(records))
    write_atomic(out_dir / "leaderboard.md", markdown(records, "kvbench compare"))


def default_out_dir(methods: list[str]) -> Path:
    return Path("reports") / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{'-'.join(methods)}"
