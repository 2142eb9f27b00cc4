"""Faults from the machine, not the input: a full disk mid-write leaves the last complete file and no temporary
behind, and the CLI ends such a run with one line and exit 2 (SIGKILL and resume: tests/test_sweep.py)."""

from __future__ import annotations

import errno
import os

import pytest

from kvbench.records import write_atomic


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_full_disk_keeps_the_last_complete_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "results.json"
    target.write_text("the last complete results")
    if where == "rename":
        monkeypatch.setattr(os, "replace", disk_full)
    else:
        real = os.fdopen

        def fdopen(fd, *args, **kwargs):
            handle = real(fd, *args, **kwargs)
            handle.write = disk_full
            return handle

        monkeypatch.setattr(os, "fdopen", fdopen)
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
