"""The finished-cell store of `kvbench leaderboard`: one JSON file per cell, named by the hash of its configuration.

A cell is written whole (temporary file, then rename) and, when it cannot be read back, reported by file name and
computed again. While a sweep computes a cell it holds a claim (`KEY.claim`, made with O_EXCL), so two sweeps
sharing a store never compute the same cell: the second works on other cells and then waits for the first's
result. A claim whose process is gone (killed) is stale and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from kvbench.evaluation.compare import Cell
from kvbench.files import write_atomic

UNREADABLE_CLAIM_S = 10.0  # a claim file still empty after this long was left by a killed process


def read_cell(path: Path) -> Cell | None:
    """A stored cell, or None (reported by file name) when it cannot be one: truncated, unreadable, or not
    shaped like a cell. Such a file never blocks a sweep: the cell is computed again and the file replaced."""
    try:
        data = json.loads(path.read_text())
        cell = Cell(**data)
        if not (isinstance(cell.task, str) and isinstance(cell.samples, list) and cell.samples
                and all(isinstance(s, dict) and "score" in s for s in cell.samples)
                and isinstance(cell.scores, dict) and isinstance(cell.metrics, dict) and isinstance(cell.host, str)):
            raise ValueError("not a finished cell")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        print(f"kvbench: ignoring the unreadable cell {path} ({type(err).__name__}: {err}); computing it again",
              file=sys.stderr)
        return None
    return cell


class CellStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.held: set[str] = set()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Cell | None:
        path = self.path(key)
        return read_cell(path) if path.exists() else None

    def put(self, key: str, cell: Cell) -> None:
        write_atomic(self.path(key), json.dumps(asdict(cell)))

    def claim(self, key: str) -> bool:
        """Take the right to compute `key`: True, or False while another live sweep holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{key}.claim"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # its sweep was killed: take the cell over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
            self.held.add(key)
            return True
        return False

    def release(self, key: str) -> None:
        (self.root / f"{key}.claim").unlink(missing_ok=True)
        self.held.discard(key)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)

    @staticmethod
    def _stale(path: Path) -> bool:
        """A claim of a process on this host that no longer runs, or one that cannot be read. A claim from another
        host (a shared folder) is trusted: delete its file to take the cell over."""
        try:
            owner = json.loads(path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return False  # released meanwhile: the next claim attempt decides
        except (OSError, ValueError, KeyError, TypeError):  # being written, or left by a process killed meanwhile
            try:
                return time.time() - path.stat().st_mtime > UNREADABLE_CLAIM_S
            except FileNotFoundError:
                return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False
