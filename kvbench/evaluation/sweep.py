"""`kvbench leaderboard`: the published sweep (models × methods × budgets × position modes × tasks), resumable.

A sweep is a TOML file (leaderboard/sweep.toml): one `model` or several `models`, each loaded once, with a table per
model in the leaderboard; a row runs on every model, or on those its own `models` names. Each (model, policy,
position mode, task) is a *cell*; a finished cell is stored under the hash of everything that determines its
results, by content (`Runner.cell_config`: the model's weights, policy config, task and its metadata, limit, prefill
chunk, the library releases that change numbers and the kvbench source), so an interrupted sweep resumes where it
stopped and any change reruns what it touches; two sweeps sharing a store never compute the same cell (`cells.py`).
LEADERBOARD.md and results.json are written only once every cell is done, each to a temporary file then renamed.

`--check FILE` compares the deterministic columns of every cell run against a committed results.json (check.py).
Cells run here one after another, or as Ray tasks (`--executor ray`, ray_cells.py); a task's cells may run as shards of
its documents (`shards = { TASK = N }`, shards.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvbench.evaluation import ray_cells, results, shards
from kvbench.evaluation.cells import LEASE_S, CellStore, cell_key
from kvbench.evaluation.check import Comparison, committed, compare_deterministic
from kvbench.evaluation.compare import Cell, CompareSpec, Runner, describe, method_params, plan
from kvbench.evaluation.leaderboard import markdown, overview
from kvbench.evaluation.lmeval_tasks import document_sizes
from kvbench.evaluation.ray_cells import RayOptions
from kvbench.evaluation.records import cpu_model, source_hash
from kvbench.evaluation.shards import Documents
from kvbench.files import write_atomic, write_with_derived
from kvbench.lmeval.tasks import check_metadata
from kvbench.policy import Budget
from kvbench.runtime import models
from kvbench.runtime.runspec import RunSpec
from kvbench.runtime.session import check_positions

SWEEP_KEYS = {"model", "models", "device", "dtype", "prefill_chunk", "limit", "tasks", "task_metadata", "shards",
              "rows", "slices"}
ROW_KEYS = {"models", "methods", "tasks", "budgets", "positions", "queries", "schedules", "kv_quant", "method_args"}
SLICE_KEYS = {"models", "methods", "tasks", "budgets", "kv_quant"}
MODEL_KEYS = {"name", "dtype"}


@dataclass
class Sweep:
    spec: CompareSpec  # shared settings: the first model, tasks, their metadata, limit, chunk
    rows: list[CompareSpec]  # per model, each group of rows: methods × budgets × positions (× method_args) on its tasks
    source: str = ""
    slice: str | None = None
    slices: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    models: list[tuple[str, str]] = field(default_factory=list)  # (model, dtype), in the sweep file's order
    shards: dict[str, int] = field(default_factory=dict)  # task -> shards each of its cells runs as (shards.py)


def _models(raw: dict[str, Any], path: Path, dtype: str | None) -> list[tuple[str, str]]:
    """`model = "name"` or `models = ["a", { name = "b", dtype = "bfloat16" }]`: (model, dtype) pairs; `dtype` (the
    command line's) replaces every model's."""
    if "model" in raw and "models" in raw:
        raise ValueError(f"{path}: give model (one) or models (several), not both")
    default = str(raw.get("dtype", "float32"))
    if "models" not in raw:
        return [(str(raw.get("model", models.DEFAULT_MODEL)), dtype or default)]
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: models = {entries!r} is not a non-empty list of names or {{ name, dtype }} tables")
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            _only(entry, MODEL_KEYS, f"{path} models entry {entry!r}")
            if not isinstance(entry.get("name"), str):
                raise ValueError(f"{path}: models entry {entry!r} has no name")
            out.append((entry["name"], dtype or str(entry.get("dtype", default))))
        elif isinstance(entry, str):
            out.append((entry, dtype or default))
        else:
            raise ValueError(f"{path}: models entry {entry!r} is not a name or a {{ name, dtype }} table")
    repeated = sorted({m for m, _ in out if sum(1 for n, _ in out if n == m) > 1})
    if repeated:
        raise ValueError(f"{path}: models lists {', '.join(repeated)} more than once")
    return out


def by_model(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The records of each model, in the order the models first appear."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["config"]["model"], []).append(r)
    return out


def _slug(model: str) -> str:
    """A folder name for a model's plots."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name or model)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise ValueError(f"{where} must be a list of names or numbers, got {value!r}")
    return [str(v) for v in value]


def _check_types(raw: dict[str, Any], path: Path) -> None:
    """The shape of every top-level entry, before any value is used (a wrong type is named, never a traceback)."""
    expected = {"model": (str, "a name"), "device": (str, "a name"), "dtype": (str, "a name"),
                "prefill_chunk": (int, "a whole number >= 1"), "limit": (int, "a whole number >= 1"),
                "tasks": (list, "a list of task names"), "task_metadata": (dict, "a table of tables, one per task"),
                "rows": (list, "an array of [[rows]] tables"), "slices": (dict, "a table of [slices.NAME] tables"),
                "shards": (dict, "a table of task = number of shards, e.g. { kvbench_ruler = 4 }")}
    for key, (kind, allowed) in expected.items():
        value = raw.get(key)
        if value is None:
            continue
        bad = not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1)
        bad = bad or (key == "rows" and not all(isinstance(r, dict) for r in value))
        bad = bad or (key in ("slices", "task_metadata") and not all(isinstance(v, dict) for v in value.values()))
        if bad:
            raise ValueError(f"{path}: {key} = {value!r} is not {allowed}")
    for task, n in raw.get("shards", {}).items():
        if task not in raw.get("tasks", []):
            raise ValueError(f"{path}: shards names {task!r}, which is not among the sweep's tasks "
                             f"({', '.join(raw.get('tasks', []))})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{path}: shards.{task} = {n!r} is not a whole number of shards >= 1")
    for i, group in enumerate(raw.get("rows", [])):
        args = group.get("method_args", {})
        if not (isinstance(args, dict) and all(isinstance(kv, dict) for kv in args.values())):
            raise ValueError(f"{path} [[rows]] #{i + 1}: method_args = {args!r} is not a table of tables, e.g. "
                             "{ h2o = { heavy_ratio = 0.3 } }")
        for method, kv in args.items():
            for key, value in kv.items():
                if not isinstance(value, str | int | float):
                    raise ValueError(f"{path} [[rows]] #{i + 1}: method_args.{method}.{key} = {value!r} is not a "
                                     "number, a string or a boolean")


def _only(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ValueError(f"{where}: unknown key {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def load(path: Path, slice_name: str | None = None, dtype: str | None = None) -> Sweep:
    """Parse and validate a sweep file; `slice_name` keeps only that slice's methods, tasks and budgets, `dtype`
    replaces the file's model dtype."""
    if not path.is_file():
        raise FileNotFoundError(f"sweep config not found: {path} (the published sweep is leaderboard/sweep.toml in "
                                "the kvbench repository: run from a checkout or pass --config)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    _only(raw, SWEEP_KEYS, str(path))
    _check_types(raw, path)
    slices = raw.get("slices", {})
    slice_budgets: dict[str, set[Budget]] = {}
    named = {str(q) for group in raw.get("rows", []) if isinstance(group.get("kv_quant", []), list)
             for q in group.get("kv_quant", ["none"])}
    for name, sl in slices.items():
        _only(sl, SLICE_KEYS, f"{path} [slices.{name}]")
        for key, value in sl.items():
            _strings(value, f"{path} [slices.{name}] {key}")
        try:
            slice_budgets[name] = {Budget.parse(b) for b in sl.get("budgets", [])}
        except ValueError as err:
            raise ValueError(f"{path} [slices.{name}] budgets: {err}") from None
        stray = sorted(set(sl.get("kv_quant", [])) - named)
        if stray:
            raise ValueError(f"{path} [slices.{name}] kv_quant: {', '.join(stray)} not in any row; the rows name "
                             f"{', '.join(sorted(named))}")
    if slice_name is not None and slice_name not in slices:
        raise ValueError(f"{path} has no slice {slice_name!r}; slices: {', '.join(slices) or 'none'}")
    chosen = slices.get(slice_name, {})
    tasks = _strings(raw.get("tasks", []), f"{path} tasks")
    if "tasks" in chosen:
        stray = sorted(set(chosen["tasks"]) - set(tasks))
        if stray:
            raise ValueError(f"slice {slice_name!r} names tasks not in the sweep: {', '.join(stray)}")
        tasks = [t for t in tasks if t in chosen["tasks"]]
    if not tasks:
        raise ValueError(f"{path}: no tasks to run")
    for task, meta in raw.get("task_metadata", {}).items():
        where = f"{path} [task_metadata.{task}]"
        if task not in raw.get("tasks", []):
            raise ValueError(f"{where}: {task!r} is not among the sweep's tasks ({', '.join(raw.get('tasks', []))})")
        check_metadata(task, meta, where)
    listed = chosen_models = _models(raw, path, dtype)
    for name, sl in slices.items():
        stray = sorted(set(sl.get("models", [])) - {m for m, _ in chosen_models})
        if stray:
            raise ValueError(f"{path} [slices.{name}] names models not in the sweep: {', '.join(stray)}")
    if "models" in chosen:
        chosen_models = [(m, d) for m, d in chosen_models if m in chosen["models"]]
    for _, model_dtype in chosen_models:
        models.parse_dtype(model_dtype)
    spec = CompareSpec(methods=[], budgets=[], tasks=tasks, model=chosen_models[0][0], limit=raw.get("limit"),
                       prefill_chunk=int(raw.get("prefill_chunk", 512)), device=str(raw.get("device", "cpu")),
                       dtype=chosen_models[0][1], task_metadata=raw.get("task_metadata", {}))
    rows = []
    for i, group in enumerate(raw.get("rows", [])):
        where = f"{path} [[rows]] #{i + 1}"
        _only(group, ROW_KEYS, where)
        methods = _strings(group.get("methods", []), f"{where} methods")
        row_models = _strings(group.get("models", [m for m, _ in listed]), f"{where} models")
        stray = sorted(set(row_models) - {m for m, _ in listed})
        if stray:
            raise ValueError(f"{where} models: {', '.join(stray)} not among the sweep's models; allowed: "
                             f"{', '.join(m for m, _ in listed)}")
        if "methods" in chosen:
            methods = [m for m in methods if m in chosen["methods"]]
        row_tasks = _strings(group.get("tasks", tasks), f"{where} tasks")
        stray = sorted(set(row_tasks) - set(raw.get("tasks", [])))
        if stray:
            raise ValueError(f"{where} tasks: {', '.join(stray)} not in the sweep's tasks; allowed: "
                             f"{', '.join(raw.get('tasks', []))}")
        row_tasks = [t for t in tasks if t in row_tasks]  # the sweep's order, within the slice
        if not methods or not row_tasks:
            continue
        budgets = [Budget.parse(b) for b in _strings(group.get("budgets", []), where)]
        if budgets and "budgets" in chosen:  # a row without budgets (full, asrkf) is not a budget's row
            budgets = [b for b in budgets if b in slice_budgets[slice_name]]
            if not budgets:
                continue
        kv_quants = _strings(group.get("kv_quant", ["none"]), f"{where} kv_quant")
        if "kv_quant" in chosen:  # a slice keeps the storages it names
            kv_quants = [q for q in kv_quants if q in chosen["kv_quant"]]
            if not kv_quants:
                continue
        args = {m: {k: str(v) for k, v in kv.items()} for m, kv in group.get("method_args", {}).items()
                if m in methods}
        rows.append((row_models, CompareSpec(**{**asdict(spec), "methods": methods, "tasks": row_tasks,
                                   "budgets": budgets,
                                   "positions": _strings(group.get("positions", ["original"]), where),
                                   "queries": _strings(group.get("queries", ["in-prompt"]), where),
                                   "schedules": _strings(group.get("schedules", []), where),
                                   "kv_quants": kv_quants,
                                   "method_args": args})))
    if not rows:
        raise ValueError(f"{path}: no rows to run" + (f" in slice {slice_name!r}" if slice_name else ""))
    for _, row in rows:
        plan(row)  # validates methods, parameters, budgets and position modes before anything runs
    rows = [replace(row, model=model, dtype=model_dtype) for model, model_dtype in chosen_models
            for row_models, row in rows if model in row_models]
    if not rows:
        raise ValueError(f"{path}: no rows for the models chosen" + (f" in slice {slice_name!r}" if slice_name else ""))
    return Sweep(spec, rows, str(path), slice_name, slices, chosen_models, dict(raw.get("shards", {})))


CLAIM_POLL_S = 2.0  # how often a sweep looks again at a cell another sweep is computing


@dataclass(frozen=True)
class Unit:
    """What one computation makes: a cell, or (with `documents`) one shard of it."""

    runner: Runner
    run: RunSpec
    task: str
    documents: Documents | None = None
    shard: str = ""  # " [shard k/N]" in messages
    size: int = 0  # characters of its documents (on Ray: the largest are handed out first)

    def name(self) -> str:
        return f"{describe(self.run)} {self.task}{self.shard}"


def _size(sizes: dict[str, list[int]], documents: Documents | None) -> int:
    """The characters of a cell's documents (`documents` None), or of a shard's."""
    return sum(sum(s) if documents is None else sum(s[i] for i in documents[name]) for name, s in sizes.items())


@dataclass
class Outcome:
    records: list[dict[str, Any]]
    ran: list[str]  # cell keys run now
    cached: list[str]  # cell keys taken from the cell store
    check: Comparison | None = None  # with --check: what moved against the committed file
    model_loads: dict[str, int] = field(default_factory=dict)  # on Ray: worker (host:pid) -> models it loaded
    worker_cells: dict[str, int] = field(default_factory=dict)  # on Ray: worker (host:pid) -> cells it computed


def run_sweep(sweep: Sweep, out_dir: Path, cells_dir: Path, plots_dir: Path | None = None,
        check: Path | None = None, progress: bool = True, ray: RayOptions | None = None) -> Outcome:
    """Every cell of `sweep` from the store or computed (here, or on Ray with `ray`), then the leaderboard. A cell
    that fails on Ray leaves the others stored and the leaderboard unwritten (`CellsFailed`)."""
    if ray is not None:
        ray_cells.check_available()
    reference = committed(check) if check else None  # read (and fail) before hours of work
    commit = _commit()  # the code the cells are computed with, not what is checked out when they finish
    plan_rows = [(row, run_) for row in sweep.rows for run_ in plan(row)]
    for row, run_ in plan_rows:  # a position mode a model cannot take, before any weights load
        check_positions(models.layout(row.model), run_.positions, run_.policy)
    runners: dict[tuple[str, str], Runner] = {}
    for model, dtype in sweep.models:
        runners[model, dtype] = Runner(replace(sweep.spec, model=model, dtype=dtype, methods=["full"]))
    code = source_hash()
    configs = {}
    todo: dict[str, Unit] = {}  # what is computed: a cell, or a shard of one
    row_keys: list[list[list[str]]] = []  # per row, per task: the keys of its cell (one) or of its shards
    sizes: dict[tuple[str, str, str], dict[str, list[int]]] = {}  # (model, dtype, task) -> its documents' sizes
    for row, run_ in plan_rows:
        runner = runners[row.model, row.dtype]
        row_keys.append([])
        for task in row.tasks:
            n = 1 if run_.query == "reuse" else sweep.shards.get(task, 1)
            if (n > 1 or ray is not None) and (row.model, row.dtype, task) not in sizes:
                sizes[row.model, row.dtype, task] = document_sizes(row.model, task, row.limit, runner.metadata[task])
            parts = shards.split({name: len(s) for name, s in sizes[row.model, row.dtype, task].items()}, n
                                 ) if n > 1 else [None]
            row_keys[-1].append([])
            for k, documents in enumerate(parts):
                config = runner.cell_config(run_, task, documents)
                key = cell_key(config)
                configs[key] = config
                size = _size(sizes[row.model, row.dtype, task], documents) if ray is not None else 0
                todo[key] = Unit(runner, run_, task, documents, f" [shard {k + 1}/{len(parts)}]" if documents else "",
                                 size)
                row_keys[-1][-1].append(key)
    outcome = Outcome([], [], [])
    store = CellStore(cells_dir)
    done: dict[str, Cell] = {}
    failed: dict[str, str] = {}
    waited: set[str] = set()
    bar = tqdm(total=len(todo), disable=not progress, desc="leaderboard", unit="cell")
    try:
        if ray is not None:
            _on_ray(todo, configs, store, ray, Progress(bar, done, failed, outcome))
        while len(done) + len(failed) < len(todo):
            waiting = False
            for key, unit in todo.items():
                if key in done or key in failed:
                    continue
                bar.set_postfix_str(unit.name())
                stored = store.get(key)
                if stored is None and store.claim(key):
                    try:
                        stored = store.get(key)  # finished by another sweep between the read and the claim
                        if stored is None:
                            done[key] = unit.runner.cell(unit.run, unit.task, unit.documents)
                            store.put(configs[key], done[key])
                            outcome.ran.append(key)
                    finally:
                        store.release(key)
                if stored is not None:
                    done[key] = stored
                    outcome.cached.append(key)
                if key in done:
                    bar.update()
                else:
                    waiting = True  # another sweep computes it: come back after the other cells
                    if key not in waited:
                        waited.add(key)
                        owner = store.owner(key) or "another sweep"
                        tqdm.write(f"kvbench: waiting for the cell {unit.name()}: {owner} computes it (a "
                                   f"claim untouched for {LEASE_S:.0f} s is taken over)", file=sys.stderr)
            if waiting and len(done) < len(todo):
                time.sleep(CLAIM_POLL_S)
    finally:
        store.release_all()  # Ctrl-C or an error: no claim outlives this process
        bar.close()
    if failed:
        raise CellsFailed(failed, {key: f"{unit.runner.spec.model} {unit.name()}" for key, unit in todo.items()},
                          len(outcome.ran) + len(outcome.cached))
    for (row, run_), keys in zip(plan_rows, row_keys, strict=True):
        runner = runners[row.model, row.dtype]
        cells = [done[parts[0]] if todo[parts[0]].documents is None else
                 shards.merge(row.model, task, row.limit, runner.metadata[task], [done[k] for k in parts])
                 for task, parts in zip(row.tasks, keys, strict=True)]
        outcome.records.append(runners[row.model, row.dtype].record(run_, cells, set(method_params(row, run_.method))))
    header = _header(sweep, code, commit, outcome, Counter(c.host for c in done.values()))
    if reference is not None:
        outcome.check = compare_deterministic(outcome.records, reference)
    plots = _plots(outcome.records, out_dir, plots_dir, len(sweep.models))
    write_with_derived(out_dir / "results.json", results.dumps("leaderboard", header, outcome.records),
                       {out_dir / "LEADERBOARD.md": _markdown(header, outcome.records, plots)})
    return outcome


def _plots(records: list[dict[str, Any]], out_dir: Path, plots_dir: Path | None, models_run: int
           ) -> dict[str, dict[str, str]]:
    """Each model's plots (in a folder of its own when the sweep ran several), by name, relative to `out_dir`."""
    if plots_dir is None:
        return {}
    from kvbench.evaluation.plots import draw_all

    out = {}
    for model, own in by_model(records).items():
        where = plots_dir if models_run == 1 else plots_dir / _slug(model)
        out[model] = {name: os.path.relpath(p, out_dir) for name, p in draw_all(own, where).items()}
    return out


def render(out_dir: Path, plots_dir: Path | None) -> None:
    """LEADERBOARD.md and the plots again from `out_dir`'s results.json, running nothing: a new table or column
    shown for the records a sweep already made."""
    data = results.load(out_dir / "results.json", "--render")
    if data.get("kind") != "leaderboard":
        raise ValueError(f"--render {out_dir / 'results.json'}: written by `kvbench {data.get('kind')}`, not by "
                         "`kvbench leaderboard`")
    header, records = data["run"], data["records"]
    if "models" not in header:  # written before sweeps took several models: its one model
        header = {**header, "models": [{"model": header["model"], "model_file": header["model_file"]}]}
    plots = _plots(records, out_dir, plots_dir, len(header["models"]))
    write_atomic(out_dir / "LEADERBOARD.md", _markdown(header, records, plots))


@dataclass
class Progress:
    """What the sweep has so far, shown on its one bar as done / running / cached / failed."""

    bar: Any
    done: dict[str, Cell]
    failed: dict[str, str]
    outcome: Outcome

    def show(self, running: str) -> None:
        self.bar.set_postfix_str(f"{len(self.outcome.ran)} run, {running}, {len(self.outcome.cached)} cached, "
                                 f"{len(self.failed)} failed")


def _on_ray(todo: dict[str, Unit], configs: dict[str, dict[str, Any]], store: CellStore, options: RayOptions,
            progress: Progress) -> None:
    """The cells (and shards) neither stored nor claimed by another sweep, computed on Ray: each claimed first (so a
    sweep sharing the store leaves it alone), stored as it arrives, released when it fails."""
    mine = {}
    model_order = {id(runner): k for k, runner in enumerate(dict.fromkeys(unit.runner for unit in todo.values()))}
    # model by model (a worker switches models rarely), the longest first (the short ones end the sweep)
    for key, unit in sorted(todo.items(), key=lambda item: (model_order[id(item[1].runner)], -item[1].size)):
        stored = store.get(key)
        if stored is not None:
            progress.done[key] = stored
            progress.outcome.cached.append(key)
            progress.bar.update()
        elif store.claim(key):
            mine[key] = (unit.runner.spec, unit.run, unit.task, unit.documents)

    def arrived(key: str, cell: Cell | None, running: str) -> None:
        if cell is not None:
            store.put(configs[key], cell)
            progress.done[key] = cell
            progress.outcome.ran.append(key)
        store.release(key)
        progress.bar.update()
        progress.show(running)

    if mine:
        got = ray_cells.run_cells(mine, options, arrived)
        progress.failed.update(got.failed)
        progress.outcome.model_loads, progress.outcome.worker_cells = dict(got.loads), dict(got.cells)


class CellsFailed(RuntimeError):
    """Cells that failed on every try: the others are stored (a rerun computes only these), no leaderboard."""

    def __init__(self, failed: dict[str, str], names: dict[str, str], finished: int) -> None:
        lines = [f"{names[key]}: {error}" for key, error in failed.items()]
        super().__init__(f"{len(failed)} cell(s) failed after {1 + ray_cells.RETRIES} tries; {finished} others are in "
                         "the cell store (a rerun computes only the failed ones) and no leaderboard was written:\n  "
                         + "\n  ".join(lines))


def _commit() -> str:
    """Short git commit of kvbench's checkout, '+dirty' with uncommitted changes; 'unknown' outside git."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _header(sweep: Sweep, code: str, commit: str, outcome: Outcome, hosts: Counter[str]) -> dict[str, Any]:
    each = []
    for model, dtype in sweep.models:
        source = models.resolve(model)
        each.append({"model": model, "dtype": dtype, "model_file": source.gguf_file or str(source.directory),
                     "model_sha256": models.content_digest(model)})
    one = {k: v for k, v in each[0].items() if k != "dtype"} if len(each) == 1 else {}
    return {"sweep": sweep.source, "slice": sweep.slice, **one, "models": each, "commit": commit,
            "source_hash": code, "machine": cpu_model(),
            "versions": outcome.records[0]["versions"] if outcome.records else {},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cells_run": len(outcome.ran), "cells_cached": len(outcome.cached), "hosts": dict(hosts.most_common())}


def _timings_note(hosts: dict[str, int]) -> str:
    """Where the timings come from: one machine, or (a sweep resumed elsewhere) several, which do not compare."""
    if len(hosts) <= 1:
        return "Timings are from this machine and never checked."
    where = "; ".join(f"{host}: {n} cells" for host, n in hosts.items())
    return (f"Timings come from {len(hosts)} machines ({where}) and do not compare across them: decode × full is "
            "shown only for a row measured on the machine of the `full` row. Timings are never checked.")


def _markdown(header: dict[str, Any], records: list[dict[str, Any]], plots: dict[str, dict[str, str]]) -> str:
    v = header["versions"]
    named = ", ".join(f"**{m['model']}** (`{Path(m['model_file']).name}`)" for m in header["models"])
    lines = [
        "# kvbench leaderboard", "",
        f"Model{'s' if len(header['models']) > 1 else ''} {named} · commit `{header['commit']}` · "
        f"{v.get('device')} ({header['machine']}, {v.get('torch_threads')} threads) · python {v.get('python')} · "
        f"torch {v.get('torch')} · transformers {v.get('transformers')} · lm-eval {v.get('lm_eval')} · "
        f"{header['date']}",
        "",
        f"Sweep `{header['sweep']}`" + (f" (slice `{header['slice']}`)" if header["slice"] else "")
        + f": {header['cells_run']} cells run, {header['cells_cached']} taken from the cell store"
        + (" (they keep the timings of the run that made them, so decode × full may compare two runs). "
           if header["cells_cached"] else ". ")
        + f"The cells are those of kvbench's computing code at source hash `{header.get('source_hash', '?')}`: "
        "`kvbench leaderboard` takes a stored cell only at that code (at any other, it computes the cell again), and "
        "`kvbench leaderboard --render` writes this page again from results.json. CI reruns a slice at its own code "
        "and fails if a deterministic column (task scores, KV compression, KV bytes) moves beyond the bounds "
        "kvbench/evaluation/check.py documents. "
        + _timings_note(header.get("hosts", {})),
        "",
    ]
    summary = overview(records)
    if summary:
        lines += ["**At a glance** (each row paired with its model's full cache on the samples of the cells that cache "
                  "passes, 95% intervals; a row is level where they cannot separate it):", "", summary, ""]
    groups = by_model(records)
    for model, own in groups.items():
        if len(groups) > 1:  # a table per model (and query mode): rows compare with their own model's full cache
            lines += [f"## {model}", "", markdown(own).split("\n", 1)[0], ""]
        lines.append(markdown(own).split("\n", 2)[2].rstrip())  # the tables and notes, without the model line
        if plots.get(model):
            lines += ["", "## Plots" if len(groups) == 1 else f"### Plots ({model})", ""]
            lines += [f"- [{name}]({path})" for name, path in plots[model].items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
