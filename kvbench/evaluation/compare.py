"""`kvbench compare`: every method on the same model and the same samples, one record per (method, budget)."""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvbench.evaluation import lmeval_tasks, results
from kvbench.evaluation.deployment import ModelShape
from kvbench.evaluation.leaderboard import markdown
from kvbench.evaluation.records import host, numeric_versions, source_hash, summarize, versions
from kvbench.files import write_with_derived
from kvbench.kv.quant import codec
from kvbench.lmeval.tasks import check_metadata, metadata_defaults, query_modes
from kvbench.policy import SCHEDULES, Budget, available, make_policy, policy_class
from kvbench.runtime import models
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import QUERY_MODES, Engine
from kvbench.runtime.runspec import RunSpec
from kvbench.runtime.session import check_positions
from kvbench.tasks import check_window


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
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
    device_map: str | None = None  # accelerate's device map (e.g. auto) for a model larger than one device
    context_lengths: tuple[int, ...] | None = None  # overrides the needle tasks' lengths
    positions: list[str] = field(default_factory=lambda: ["original"])
    queries: list[str] = field(default_factory=lambda: ["in-prompt"])  # where the question goes (QUERY_MODES)
    schedules: list[str] = field(default_factory=list)  # when decisions apply (SCHEDULES); empty: each method's own
    kv_quants: list[str] = field(default_factory=lambda: ["none"])  # how K/V rows are stored (kvbench/kv/quant.py)
    task_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # lm-eval tasks: metadata overrides

    def to_json(self) -> dict[str, Any]:
        """The spec as a results file's `run`: typed budgets; method_args as given (each record's config.policy
        holds the values they parsed to)."""
        out = asdict(self)
        out["budgets"] = [b.to_json() for b in self.budgets]
        out["context_lengths"] = list(self.context_lengths) if self.context_lengths else None
        return out


def parse_method_args(items: list[str]) -> dict[str, dict[str, str]]:
    """['asrkf:tau=0.5,window=32', 'h2o:heavy_ratio=0.3'] -> {'asrkf': {'tau': '0.5', ...}, ...}. A key given twice
    for one method is refused: the second value would silently replace the first where variants were meant."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or not method or not rest:
            raise ValueError(f"--method-args {item!r} must look like METHOD:key=value[,key=value...]")
        for pair in rest.split(","):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--method-args {item!r}: {pair!r} is not key=value")
            own = out.setdefault(method.strip(), {})
            if key.strip() in own:
                raise ValueError(f"--method-args {item!r}: {method.strip()}'s {key.strip()} is given twice "
                                 f"({own[key.strip()]} and {value.strip()}); a method's parameters are merged into "
                                 f"one set, so write variants as one value, {key.strip()}={own[key.strip()]}|"
                                 f"{value.strip()} (a row per combination of the values)")
            own[key.strip()] = value.strip()
    return out


def plan(spec: CompareSpec) -> list[RunSpec]:
    """Every run (method, budget, parameters, position mode, query mode), each checked before anything expensive
    happens. A budget list applies to the methods that take a budget; position modes to the methods that evict."""
    if not spec.methods:
        raise ValueError(f"--methods names no method; known methods: {', '.join(available())}")
    if not spec.tasks:
        raise ValueError("--tasks names no task (e.g. --tasks needle-1k,kvbench_needle)")
    stray = sorted(set(spec.method_args) - set(spec.methods))
    if stray:
        raise ValueError(f"--method-args names {', '.join(stray)}, which is not among --methods")
    if not spec.positions or not spec.queries or not spec.kv_quants:
        raise ValueError("--positions, --query and --kv-quant each need at least one value")
    for scheme in spec.kv_quants:
        codec(scheme)  # an unknown scheme, named with the allowed ones
    bad = [s for s in spec.schedules if s not in SCHEDULES]
    if bad:
        raise ValueError(f"--schedule {','.join(bad)!r} is not a schedule; allowed: {', '.join(SCHEDULES)}")
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"--limit must be a positive number of samples, got {spec.limit}")
    for task in spec.tasks:  # a mode a task cannot be computed in is refused, never run in-prompt under its label
        modes = query_modes(task)
        wrong = [q for q in dict.fromkeys(spec.queries) if q in QUERY_MODES and modes is not None and q not in modes]
        if wrong:
            raise ValueError(f"--query {','.join(wrong)}: {task} does not mark its question (a question after the "
                             f"compressed context needs one); it runs with: {', '.join(modes)}")
    runs = []
    for name in dict.fromkeys(spec.methods):
        budgets: list[Budget | None] = (spec.budgets or [None]) if RunSpec.takes_budget(name) else [None]
        for params in expand_sweep(method_params(spec, name)):
            built = {}  # a method that never evicts runs once whatever position modes were asked for
            for b, m, q, kq in itertools.product(budgets, dict.fromkeys(spec.positions), dict.fromkeys(spec.queries),
                                                 dict.fromkeys(spec.kv_quants)):
                if kq != "none" and m == "rerotate" and policy_class(name).evicts:
                    continue  # a re-rotated key would be quantized again at each eviction: refused by RunSpec
                run = RunSpec.build(name, b, params, m, q, kq)
                built.setdefault((b, run.positions, q, run.kv_quant), run)
            runs.extend(built.values())
    return runs


def method_params(spec: CompareSpec, name: str) -> dict[str, str]:
    """A method's parameters in a run: its --method-args, plus the --schedule sweep where it evicts."""
    params = dict(spec.method_args.get(name, {}))
    if spec.schedules and policy_class(name).evicts:
        params.setdefault("schedule", "|".join(dict.fromkeys(spec.schedules)))
    return params


def expand_sweep(params: dict[str, str]) -> list[dict[str, str]]:
    """{'tau': '0.25|0.5', 'k': '1'} -> [{'tau': '0.25', 'k': '1'}, {'tau': '0.5', 'k': '1'}]."""
    keys = list(params)
    choices = [params[k].split("|") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


@dataclass
class Cell:
    """One policy (in one position mode) on one task: per-sample records and the task's scores."""

    task: str
    samples: list[dict[str, Any]]
    scores: dict[str, float] = field(default_factory=dict)  # lm-eval's aggregates
    metrics: dict[str, str] = field(default_factory=dict)
    host: str = "unknown"  # where its timings were measured (device, CPU, threads); a cell stored before had none
    responses: dict[str, list[list[Any]]] = field(default_factory=dict)  # a shard's lm-eval responses (shards.py)


class Runner:
    """Loads the model once, then runs cells (a run on one task, through lm-eval) and folds them into records."""

    def __init__(self, spec: CompareSpec) -> None:
        names = list(dict.fromkeys(spec.tasks))
        unknown = [t for t in names if t not in lmeval_tasks.task_names()]
        if unknown:
            raise ValueError(f"unknown task {', '.join(map(repr, unknown))}; kvbench's tasks: "
                             f"{', '.join(lmeval_tasks.task_names())}")
        self.spec, self.task_names = spec, names
        with_lengths = {t for t in names if "context_lengths" in (metadata_defaults(t) or {})}
        if spec.context_lengths and not with_lengths:
            raise ValueError(f"--context-lengths: none of {', '.join(names)} takes context lengths (the needle tasks "
                             "and the RULER-style suite do)")
        self.metadata = {t: self._metadata(t, t in with_lengths) for t in names}
        models.parse_dtype(spec.dtype)
        if spec.device_map is None:
            models.check_device(spec.device)
        models.resolve(spec.model)  # fail fast on a missing model, before loading anything
        shape = models.layout(spec.model)  # an unsupported model, or a position mode it cannot take, before the weights
        for run in plan(spec):
            check_positions(shape, run.positions, run.policy)
        lm, tok = models.load(spec.model, device=spec.device, dtype=spec.dtype, device_map=spec.device_map)
        self.engine = Engine(lm, tok, prefill_chunk=spec.prefill_chunk)
        self.shape = ModelShape.of(lm)
        for task in with_lengths:  # before any cell runs, not when a sweep reaches the task hours later
            meta = {**(metadata_defaults(task) or {}), **(self.metadata[task] or {})}
            check_window(task, [*meta.get("context_lengths", []), *meta.get("varied_context_lengths", [])],
                         self.engine.max_positions, spec.model)
        warm_up = encode_chat(self.engine.tokenizer, "Hello")
        self.engine.generate(warm_up, make_policy("full"), max_new_tokens=4)
        self.config = {"model": spec.model, "model_sha256": models.content_digest(spec.model), "device": spec.device,
                       "dtype": str(lm.dtype).removeprefix("torch."), "attention": self.engine.attention_backend,
                       "prefill_chunk": spec.prefill_chunk, "limit": spec.limit}
        self.versions = versions()
        self.numeric_versions = numeric_versions()  # part of every cell's identity
        self.host = host(self.versions)

    def _metadata(self, task: str, takes_lengths: bool) -> dict[str, Any] | None:
        """The task's metadata overrides: the spec's for the task, `--context-lengths` where the task takes
        context lengths (the needle tasks, the RULER-style suite)."""
        meta = dict(self.spec.task_metadata.get(task) or {})
        if self.spec.context_lengths and takes_lengths:
            meta.setdefault("context_lengths", list(self.spec.context_lengths))
        if meta:
            check_metadata(task, meta, f"{task} (--context-lengths or task metadata)")
        return meta or None

    def cell_config(self, run: RunSpec, task: str, documents: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """Everything that determines a cell's results, by content: the model's (not its name), the run, the task
        and its settings (its data is generated from them, by code in the source hash, with the model's tokenizer),
        the library releases that change numbers and kvbench's source; a shard's documents (shards.py). The cell
        store's key is its hash."""
        shard = {"documents": documents} if documents else {}
        quant = {"kv_quant": run.kv_quant} if run.kv_quant else {}  # absent for the model's dtype: older keys hold
        return {**self.config, "policy": {"name": run.method, **run.policy.config()}, "positions": run.positions,
                "query": run.query, "task": task, "task_metadata": self.metadata[task],
                "versions": self.numeric_versions, "source": source_hash(), **quant, **shard}

    def cell(self, run: RunSpec, task: str, documents: dict[str, list[int]] | None = None) -> Cell:
        """The run on `task`; with `documents`, a shard: only those, keeping lm-eval's responses for the merge."""
        got = lmeval_tasks.evaluate(self.engine, self.spec.model, run, task, self.spec.limit, self.metadata[task],
                                    documents)
        return Cell(task, got.samples, got.scores, got.metrics, self.host, got.responses if documents else {})

    def record(self, run: RunSpec, cells: list[Cell], explicit: set[str]) -> dict[str, Any]:
        """One leaderboard row: the run's cells on every task, summarized."""
        policy, mode, query = run.policy, run.positions, run.query
        config_now = policy.config()
        samples = [s for c in cells for s in c.samples]
        quant = {"kv_quant": run.kv_quant} if run.kv_quant else {}
        return {
            "method": policy.name,
            "variant": ",".join(f"{k}={config_now[k]}" for k in sorted(explicit)),
            "budget": policy.budget.to_json() if policy.budget is not None else None,
            "positions": mode,
            "query": query,
            "schedule": policy.schedule if policy.evicts else None,
            **quant,
            "config": {**self.config, "positions": mode, "query": query, "policy": config_now, **quant,
                       "task_metadata": {t: m for t, m in self.spec.task_metadata.items() if t in self.task_names}},
            "versions": self.versions,
            "model_shape": self.shape.to_json(),
            "hosts": sorted({c.host for c in cells}),  # a resumed sweep's cells may come from several
            "metrics": summarize(samples, {k: v for c in cells for k, v in c.scores.items()},
                                 {k: v for c in cells for k, v in c.metrics.items()}),
            "samples": samples,
        }


def run_compare(spec: CompareSpec, out_dir: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    runs = plan(spec)
    runner = Runner(spec)
    records = []
    bar = tqdm(total=len(runs) * len(runner.task_names), disable=not progress, desc="compare", unit="cell")
    for run_ in runs:
        bar.set_postfix_str(describe(run_))
        cells = []
        for task in runner.task_names:
            cells.append(runner.cell(run_, task))
            bar.update()
        records.append(runner.record(run_, cells, set(method_params(spec, run_.method))))
    bar.close()
    if out_dir is not None:
        write_outputs(spec, records, out_dir)
    return records


def describe(run: RunSpec) -> str:
    """A run in a progress bar's postfix."""
    return f"{run.method} {run.policy.budget or ''} {run.positions} {run.query}" + (f" {run.kv_quant}"
                                                                                    if run.kv_quant else "")


def write_outputs(spec: CompareSpec, records: list[dict[str, Any]], out_dir: Path) -> None:
    """results.json and leaderboard.md, each written whole or not at all, never a table beside other results."""
    write_with_derived(out_dir / "results.json", results.dumps("compare", spec.to_json(), records),
                       {out_dir / "leaderboard.md": markdown(records, "kvbench compare")})


def default_out_dir(methods: list[str], what: str = "") -> Path:
    """A new folder under reports/runs/ (not committed), named by time and methods."""
    return Path("reports") / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{what}{'-'.join(methods)}"
