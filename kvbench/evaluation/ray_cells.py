"""`kvbench leaderboard --executor ray`: a sweep's cells as Ray tasks.

The driver plans the cells, takes finished ones from the cell store and claims the rest (kvbench/evaluation/sweep.py);
this module hands those to Ray and stores each cell as it arrives. Ray does the scheduling: a cell is a task asking for
`threads` CPUs (and one GPU on CUDA); the worker process that runs it keeps the model it loaded for its next cell
(`_RUNNERS`), so a model is loaded once per worker, not per cell; a worker that dies mid-cell is replaced and the cell
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
from kvbench.runtime.runspec import RunSpec

RETRIES = 2  # further tries of a cell whose worker died or which raised

_RUNNERS: dict[str, Runner] = {}  # per worker process: the loaded model of each sweep spec it has run cells for


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: start a local one
    workers: int = 1  # cells at once on a local Ray
    threads: int = 1  # torch threads (and Ray CPUs) per cell


@dataclass
class RayOutcome:
    done: dict[str, Cell] = field(default_factory=dict)
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


def _cell(spec: CompareSpec, run: RunSpec, task: str, threads: int) -> tuple[Cell, str, int]:
    """One cell on a Ray worker: (the cell, the worker, models this worker has loaded so far)."""
    import torch

    torch.set_num_threads(threads)
    key = json.dumps(asdict(spec), sort_keys=True, default=str)
    if key not in _RUNNERS:
        _RUNNERS[key] = Runner(spec)
    return _RUNNERS[key].cell(run, task), f"{socket.gethostname()}:{os.getpid()}", len(_RUNNERS)


def run_cells(spec: CompareSpec, cells: dict[str, tuple[RunSpec, str]], options: RayOptions, device: str,
              arrived: Callable[[str, Cell | None, str], None]) -> RayOutcome:
    """Run `cells` (key -> (run, task)) on Ray; `arrived(key, cell, status)` as each finishes (cell None when it
    failed), where the caller stores it and moves its progress bar."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        local: dict[str, Any] = {} if options.address else {"num_cpus": options.workers * options.threads}
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, **local)
    outcome = RayOutcome()
    try:
        task = ray.remote(_cell).options(num_cpus=options.threads, num_gpus=1 if device.startswith("cuda") else 0,
                                         max_retries=RETRIES, retry_exceptions=True)
        pending = {task.remote(spec, run, name, options.threads): key for key, (run, name) in cells.items()}
        slots = int(ray.cluster_resources().get("GPU" if device.startswith("cuda") else "CPU", 1)
                    // (1 if device.startswith("cuda") else options.threads))

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
            outcome.done[key] = cell
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
