"""`kvbench leaderboard --executor ray`: a sweep's cells as Ray tasks.

The driver plans the cells, takes finished ones from the cell store and claims the rest (kvbench/evaluation/sweep.py);
this module hands those to Ray and stores each cell as it arrives. Ray does the scheduling: a cell is a task asking for
`threads` CPUs (and one GPU on CUDA); the worker process that runs it keeps the model it loaded for its next cell
(`_LOADED`), so a model is loaded once per worker, not per cell; a worker that dies mid-cell is replaced and the cell
runs again (`RETRIES`); a cell that raises is tried again, then reported with its error while the others go on.
`--address` joins a running cluster (`ray start` on its nodes); without it a local Ray starts with `workers` slots.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvbench.evaluation.compare import Cell, CompareSpec, Runner
from kvbench.evaluation.shards import Documents
from kvbench.runtime.runspec import RunSpec

RETRIES = 2  # further tries of a cell whose worker died or which raised

_LOADED: dict[str, Any] = {"key": None, "runner": None, "loads": 0}  # per worker process: the model it holds


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: start a local one
    workers: int = 1  # cells at once on a local Ray
    threads: int = 1  # torch threads (and Ray CPUs) per cell


@dataclass
class RayOutcome:
    failed: dict[str, str] = field(default_factory=dict)  # cell key -> its last error
    loads: Counter[str] = field(default_factory=Counter)  # worker (host:pid) -> models it loaded
    cells: Counter[str] = field(default_factory=Counter)  # worker (host:pid) -> cells it computed


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray, which is not installed: pip install 'kvbench[ray]'") from None
    return ray


def check_available() -> None:
    """Refuse `--executor ray` without Ray before anything runs."""
    _ray()


def _cell(spec: CompareSpec, run: RunSpec, task: str, documents: Documents | None,
          threads: int) -> tuple[Cell, str, int]:
    """One cell (or a shard of one: `documents`) on a Ray worker: (the cell, the worker, models this worker has loaded
    so far). A worker holds one model: a cell of another model (a sweep of several) releases it before loading its
    own, so two large models never share a worker's memory; the driver submits cells model by model, so a worker
    switches rarely."""
    import gc

    import torch

    torch.set_num_threads(threads)
    key = json.dumps(asdict(spec), sort_keys=True, default=str)
    if _LOADED["key"] != key:
        _LOADED.update(key=None, runner=None)
        gc.collect()
        _LOADED.update(key=key, runner=Runner(spec), loads=_LOADED["loads"] + 1)
    return _LOADED["runner"].cell(run, task, documents), f"{socket.gethostname()}:{os.getpid()}", _LOADED["loads"]


def run_cells(cells: dict[str, tuple[CompareSpec, RunSpec, str, Documents | None]], options: RayOptions,
              arrived: Callable[[str, Cell | None, str], None]) -> RayOutcome:
    """Run `cells` (key -> (the sweep's spec for its model, run, task, a shard's documents or None)) on Ray;
    `arrived(key, cell, status)` as each finishes (cell None when it failed), where the caller stores it and moves its
    progress bar."""
    ray = _ray()
    gpu = next(iter(cells.values()))[0].device.startswith("cuda")
    started = not ray.is_initialized()
    if started:
        local: dict[str, Any] = {} if options.address else {"num_cpus": options.workers * options.threads}
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False, **local)
        except (ConnectionError, RuntimeError) as err:
            raise ValueError(f"--address {options.address}: cannot join a Ray cluster there ({err}); start one with "
                             "`ray start --head` or leave --address out for a local Ray") from None
    outcome = RayOutcome()
    try:
        task = ray.remote(_cell).options(num_cpus=options.threads, num_gpus=int(gpu),
                                         max_retries=RETRIES, retry_exceptions=True)
        pending = {task.remote(spec, run, name, documents, options.threads): key
                   for key, (spec, run, name, documents) in cells.items()}
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1) // (1 if gpu else options.threads))

        def status() -> str:
            return f"{min(len(pending), slots)} running, {max(0, len(pending) - slots)} queued"

        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            try:
                cell, worker, loads = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                outcome.failed[key] = _reason(err)
                arrived(key, None, status())
                continue
            outcome.loads[worker] = max(outcome.loads[worker], loads)
            outcome.cells[worker] += 1
            arrived(key, cell, status())
    finally:
        if started:
            ray.shutdown()
    return outcome


def _reason(err: Exception) -> str:
    """The cell's own exception when it raised one, else what Ray says happened to its worker."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception):
        return f"{type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[0]
