"""Faults from the machine, not the input: a full disk mid-write leaves the last complete file and no temporary
behind, and the CLI ends such a run with one line and exit 2; a compare killed mid-run leaves nothing partial; two
sweeps sharing a cell store both finish with the same cells (SIGKILL and resume: tests/test_sweep.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.files import write_atomic


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_full_disk_keeps_the_last_complete_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "results.json"
    target.write_text("the last complete results")
    if where == "rename":
        monkeypatch.setattr(os, "replace", disk_full)
    else:
        real = Path.write_text

        def half_then_full(self, text, *args, **kwargs):  # part of the text reaches the disk, then it is full
            real(self, text[:3], *args, **kwargs)
            disk_full()

        monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new results")
    assert target.read_text() == "the last complete results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.model
def test_a_run_whose_results_cannot_be_written_ends_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from kvbench.cli import main

    monkeypatch.setattr(os, "replace", disk_full)
    out = tmp_path / "run"
    code = main(["compare", "--no-progress", "--methods", "full", "--tasks", "needle-1k", "--limit", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "kvbench: error: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert not out.exists() or not [p for p in out.iterdir()]


@pytest.mark.model
def test_a_compare_killed_mid_run_leaves_nothing_partial(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kvbench", "compare", "--methods", "full,streamingllm", "--budget",
                             "64", "--tasks", "needle-1k", "--limit", "3", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    while b"compare:" not in seen and proc.poll() is None:  # its progress bar: the model is loaded, cells run
        seen += proc.stderr.read1(4096)
    assert proc.poll() is None, "the run must still be going when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"a killed compare left {left}"


@pytest.mark.model
def test_two_sweeps_sharing_a_cell_store_compute_each_cell_once_and_finish_with_the_same_cells(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('tasks = ["needle-1k"]\nlimit = 1\n[[rows]]\nmethods = ["full", "streamingllm", "h2o"]\n'
                      "budgets = [64]\n")
    cells = tmp_path / "cells"
    procs = [subprocess.Popen([sys.executable, "-m", "kvbench", "leaderboard", "--config", str(config), "--out",
                               str(tmp_path / f"out{i}"), "--plots", str(tmp_path / f"plots{i}"), "--cells",
                               str(cells), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(2)]
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    stored = sorted(cells.iterdir())
    assert len(stored) == 3 and all(json.loads(p.read_text())["cell"]["samples"] for p in stored)  # whole, no temp
    results = [json.loads((tmp_path / f"out{i}" / "results.json").read_text()) for i in range(2)]
    from kvbench.evaluation.check import Comparison, Reference, compare_deterministic

    assert len(results[0]["records"]) == 3
    assert compare_deterministic(results[0]["records"], Reference(results[1]["records"])) == Comparison()
    # each cell computed by one sweep and taken from the store by the other (their claims)
    assert [r["run"]["cells_run"] + r["run"]["cells_cached"] for r in results] == [3, 3]
    assert sum(r["run"]["cells_run"] for r in results) == 3


def test_a_folder_written_whole_keeps_what_another_process_finished_first_and_leaves_no_scratch(tmp_path):
    from kvbench.files import atomic

    target = tmp_path / "model"
    with atomic(target, keep_existing=True) as scratch:
        scratch.mkdir()
        (scratch / "weights").write_text("first")
        assert not target.exists()  # nothing at the target until the block ends
    with atomic(target, keep_existing=True) as scratch:  # a second process converting the same model
        scratch.mkdir()
        (scratch / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"
    with pytest.raises(RuntimeError), atomic(tmp_path / "plot.png") as scratch:
        scratch.write_text("half a plot")
        raise RuntimeError("savefig failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("stopped_at", ["results.json", "leaderboard.md"])
def test_a_results_file_and_its_table_are_never_left_as_a_mismatched_pair(tmp_path, monkeypatch, stopped_at):
    """Stopped (Ctrl-C, a full disk) while writing either file, the folder holds no table beside results it was not
    made from: the old table is gone before new results land."""
    import kvbench.files

    (tmp_path / "results.json").write_text("old results")
    (tmp_path / "leaderboard.md").write_text("old table")
    real = kvbench.files.write_atomic

    def stop(path: Path, text: str) -> None:
        if path.name == stopped_at:
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(kvbench.files, "write_atomic", stop)
    with pytest.raises(KeyboardInterrupt):
        kvbench.files.write_with_derived(tmp_path / "results.json", "new results",
                                         {tmp_path / "leaderboard.md": "new table"})
    left = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert left == {"results.json": "old results" if stopped_at == "results.json" else "new results"}
