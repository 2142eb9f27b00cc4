"""The finished-cell store of `kvbench leaderboard`: one JSON file per cell, named by the hash of its configuration
(`Runner.cell_config`: the model's content, the policy, the task and its settings, the library versions that change
numbers, kvbench's source).

A cell file describes itself: it holds that configuration, the cell, and the sha256 of the cell. A file whose
configuration does not hash to its name (another cell's file copied there, an edited configuration), whose cell does
not match its checksum (an edited score, a damaged copy), or that is not shaped like a finished cell (truncated, an
older format, a sample lacking a field the records need) is named on stderr once and computed again, never used.

While a sweep computes a cell it holds a claim (`KEY.claim`, made with O_EXCL) and keeps it alive: a thread touches
each claim it holds every `HEARTBEAT_S`. Two sweeps sharing a store (one machine or a shared folder) therefore never
compute the same cell: the second works on other cells and then waits for the first's result. A claim is taken over
when it has not been touched for `LEASE_S` (its owner was killed or its machine went away, whatever its PID now
names), or at once when its owner on this host is gone or its PID now belongs to another process (another start time).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import psutil

from kvbench.evaluation.compare import Cell
from kvbench.evaluation.results import SCHEMA_PATH
from kvbench.files import write_atomic

FORMAT = 1  # a cell file's layout; a file of another is recomputed
UNREADABLE_CLAIM_S = 10.0  # a claim file still empty after this long was left by a killed process
HEARTBEAT_S = 15.0  # how often a sweep touches the claims it holds
LEASE_S = 120.0  # a claim untouched this long is taken over


def cell_key(config: dict[str, Any]) -> str:
    """The name of the cell computed under `config`: a hash of all of it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _checksum(cell: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()


@cache
def sample_fields() -> tuple[str, ...]:
    """The fields every sample of a record has (the results schema's definition): a cell's samples need them all."""
    return tuple(json.loads(SCHEMA_PATH.read_text())["$defs"]["sample"]["required"])


def _problem(data: Any, key: str) -> str | None:
    """Why a cell file's content cannot be the cell named `key`, or None."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"not a cell file of format {FORMAT}"
    if not isinstance(data.get("config"), dict) or cell_key(data["config"]) != key:
        return "its configuration is not the one its name stands for (another cell's file, or an edited one)"
    cell = data.get("cell")
    if not isinstance(cell, dict) or data.get("sha256") != _checksum(cell):
        return "its content does not match its checksum (edited or damaged)"
    if not (isinstance(cell.get("task"), str) and isinstance(cell.get("samples"), list) and cell["samples"]
            and isinstance(cell.get("scores"), dict) and isinstance(cell.get("metrics"), dict)
            and isinstance(cell.get("host"), str)):
        return "not shaped like a finished cell"
    for sample in cell["samples"]:
        missing = [f for f in sample_fields() if f not in sample] if isinstance(sample, dict) else ["all"]
        if missing:
            return f"a sample lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
    return None


def read_cell(path: Path, key: str) -> Cell | None:
    """The cell stored at `path` under `key`, or None, reported by file name, when the file cannot be that cell."""
    try:
        data = json.loads(path.read_text())
        problem = _problem(data, key)
        if problem is not None:
            raise ValueError(problem)
        return Cell(**data["cell"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        print(f"kvbench: ignoring the cell {path} ({type(err).__name__}: {err}); computing it again", file=sys.stderr)
        return None


class CellStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.held: set[str] = set()
        self._beating: threading.Event | None = None
        self._reported: dict[str, tuple[int, int]] = {}  # a bad cell file's (change time, size) once named

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Cell | None:
        """The stored cell, or None: absent, or unusable (named on stderr once per version of the file)."""
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if self._reported.get(key) == (st.st_mtime_ns, st.st_size):
            return None
        cell = read_cell(path, key)
        if cell is None:
            self._reported[key] = (st.st_mtime_ns, st.st_size)
        return cell

    def put(self, config: dict[str, Any], cell: Cell) -> str:
        """Store `cell`, computed under `config`, with its configuration and checksum; returns its key."""
        key, payload = cell_key(config), asdict(cell)
        write_atomic(self.path(key), json.dumps({"format": FORMAT, "key": key, "config": config,
                                                 "sha256": _checksum(payload), "cell": payload}))
        return key

    def claim(self, key: str) -> bool:
        """Take the right to compute `key`: True, or False while another live sweep holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{key}.claim"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.owner(key) is not None:
                    return False
                print(f"kvbench: taking over the cell {key}: its claim was left by a sweep that stopped",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "pid_started": psutil.Process().create_time()}, fh)
            self.held.add(key)
            self._heartbeat()
            return True
        return False

    def owner(self, key: str) -> str | None:
        """Who holds a live claim on `key` (for a message), or None when no claim stands: none, or a stale one."""
        path = self.root / f"{key}.claim"
        try:
            age = time.time() - path.stat().st_mtime
            owner = json.loads(path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # being written, or left by a process killed meanwhile
            return None if age > UNREADABLE_CLAIM_S else "a sweep starting"
        if age > LEASE_S:
            return None
        if host == socket.gethostname() and not _same_process(pid, owner.get("pid_started")):
            return None
        return f"pid {pid} on {host} (its last heartbeat {age:.0f} s ago)"

    def release(self, key: str) -> None:
        (self.root / f"{key}.claim").unlink(missing_ok=True)
        self.held.discard(key)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)
        if self._beating is not None:
            self._beating.set()
            self._beating = None

    def _heartbeat(self) -> None:
        """Touch every held claim each HEARTBEAT_S until `release_all` (a daemon thread: it ends with the process)."""
        if self._beating is not None:
            return
        stop = self._beating = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                for key in list(self.held):
                    try:
                        os.utime(self.root / f"{key}.claim")
                    except OSError:
                        continue

        threading.Thread(target=beat, name="kvbench-claims", daemon=True).start()


def _same_process(pid: int, started: Any) -> bool:
    """Whether `pid` still names the process that made a claim on this host: alive, and (when the claim says) started
    at the same time, so a PID reused after a restart does not hold a cell forever."""
    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - float(started)) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError, TypeError):
        return True
