"""`kvbench leaderboard --executor ray` on a local Ray: the local executor's cells (needle-1k's as two shards), a
worker killed mid-cell replaced and its cell run again, a model loaded once per worker, a rerun from the store,
refusals. A tiny random Llama: the mechanics of distribution, never a reported result."""

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from kvbench import policy
from kvbench.cli import main
from kvbench.evaluation import sweep
from kvbench.evaluation.check import Comparison
from kvbench.evaluation.ray_cells import RETRIES, RayOptions
from kvbench.methods.streamingllm import StreamingLLM

SWEEP = """
model = "{model}"
tasks = ["needle-1k", "kvbench_ruler_niah_single_1"]
limit = 2
shards = {{ "needle-1k" = 2 }}
[task_metadata.kvbench_ruler_niah_single_1]
context_lengths = [512]
[[rows]]
methods = ["full", "h2o"]
budgets = [64]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    import tiny
    from kvbench.runtime import models

    root = tmp_path_factory.mktemp("ray")
    tiny.build("llama", "sdpa", seed=0).save_pretrained(root / "model")
    models.load_tokenizer().save_pretrained(root / "model")
    path = root / "sweep.toml"
    path.write_text(SWEEP.format(model=root / "model"))
    return path


def _kill_first_cell(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen computing a cell (its process title is `ray::_cell` while it does)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["cmdline"]):
            if (proc.info["cmdline"] or [""])[0].startswith("ray::_cell"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.02)


def _predictions(out: Path) -> list[list[str]]:
    return [[s["prediction"] for s in r["samples"]] for r in json.loads((out / "results.json").read_text())["records"]]


def test_ray_gives_the_local_cells_survives_a_killed_worker_and_a_rerun_takes_every_cell_from_the_store(config):
    root = config.parent
    local = sweep.run_sweep(sweep.load(config), root / "local", root / "cells-local", None, progress=False)
    assert len(local.ran) == 6 and local.model_loads == {}  # needle-1k's cells as two shards each

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_cell, args=(killed, stop), daemon=True)
    killer.start()
    try:
        ray = sweep.run_sweep(sweep.load(config), root / "ray", root / "cells-ray", None,
                              check=root / "local" / "results.json", progress=False, ray=RayOptions(workers=2))
    finally:
        stop.set()
        killer.join()
    assert killed, "a worker must be killed while it computes a cell"
    assert len(ray.ran) == 6 and ray.check == Comparison()  # every deterministic column: the local executor's
    assert _predictions(root / "ray") == _predictions(root / "local")
    workers = ray.model_loads
    assert f"{socket.gethostname()}:{killed[0]}" not in ray.worker_cells  # its cell was finished by another worker
    assert len(workers) >= 2 and set(workers.values()) == {1}  # each worker loaded the model once ...
    assert sum(ray.worker_cells.values()) == 6 and max(ray.worker_cells.values()) >= 2  # ... for all its cells

    again = sweep.run_sweep(sweep.load(config), root / "ray", root / "cells-ray", None, progress=False,
                            ray=RayOptions(workers=2))
    assert again.ran == [] and sorted(again.cached) == sorted(ray.ran) and again.model_loads == {}


@pytest.mark.parametrize("args,message", [
    (["--workers", "2"], "--workers only apply with --executor ray"),
    (["--executor", "ray", "--threads", "0"], "each must be a whole number >= 1"),
    (["--executor", "ray", "--address", "auto", "--workers", "2"], "--workers sizes a local Ray"),
])
def test_executor_flags_are_checked_before_anything_runs(config, capsys, args, message):
    assert main(["leaderboard", "--config", str(config), "--out", str(config.parent / "never"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (config.parent / "never").exists()


def test_executor_ray_without_ray_names_the_extra_to_install(config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    out = config.parent / "no-ray"
    assert main(["leaderboard", "--config", str(config), "--out", str(out), "--executor", "ray"]) == 2
    assert "pip install 'kvbench[ray]'" in capsys.readouterr().err
    assert not (out / "results.json").exists()


class Failing(StreamingLLM):
    """StreamingLLM whose every decision raises: a method with a bug, found hours into a sweep."""

    name = "failing"

    def step(self, view):
        raise RuntimeError("this method fails at its first decision")


def test_a_failing_cell_is_retried_then_reported_while_the_others_are_stored(config, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    monkeypatch.setitem(policy._REGISTRY, "failing", Failing)
    root = config.parent / "failing"
    root.mkdir()
    path = root / "sweep.toml"
    path.write_text(config.read_text().replace('methods = ["full", "h2o"]', 'methods = ["full", "failing"]'))
    with pytest.raises(sweep.CellsFailed) as failed:
        sweep.run_sweep(sweep.load(path), root / "out", root / "cells", None, progress=False, ray=RayOptions(workers=2))
    report = str(failed.value)
    assert f"3 cell(s) failed after {1 + RETRIES} tries; 3 others are in the cell store" in report
    assert report.count("RuntimeError: this method fails at its first decision") == 3
    assert report.count("failing 64 original in-prompt") == 3 and "needle-1k [shard 2/2]" in report
    assert len(list((root / "cells").glob("*.json"))) == 3 and not (root / "out" / "results.json").exists()


class Handed(Exception):
    """Raised by a stand-in for Ray once it has seen the cells it is handed."""


def test_ray_is_handed_the_cells_model_by_model_and_the_longest_first(config, monkeypatch):
    """Ray starts cells in the order it is given them: the short ones last, so no worker waits long for the last
    cell; model by model, so a worker switches models rarely. The sweep's own order is the other way round."""
    root = config.parent / "order"
    root.mkdir()
    path = root / "sweep.toml"
    model, other = config.parent / "model", root / "other"
    shutil.copytree(model, other)
    path.write_text(f"""
models = ["{model}", {{ name = "{other}", dtype = "bfloat16" }}]
tasks = ["kvbench_ruler_niah_single_1", "needle-1k"]
limit = 2
[task_metadata.kvbench_ruler_niah_single_1]
context_lengths = [256]
[[rows]]
methods = ["full", "h2o"]
budgets = [64]
""")
    handed: list[tuple[str, str, str]] = []

    def run_cells(cells, options, arrived):
        handed.extend((spec.dtype, run.method, task) for spec, run, task, _ in cells.values())
        raise Handed

    monkeypatch.setattr(sweep.ray_cells, "run_cells", run_cells)
    with pytest.raises(Handed):
        sweep.run_sweep(sweep.load(path), root / "out", root / "cells", None, progress=False, ray=RayOptions())
    assert handed == [(dtype, method, task) for dtype in ("float32", "bfloat16")
                      for task in ("needle-1k", "kvbench_ruler_niah_single_1") for method in ("full", "h2o")]
