"""Files and folders written whole or not at all: a reader (a second sweep, a user's editor, the rerun after a kill)
never sees half of one, and a failed write leaves the old one in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """A scratch path next to `path` (same file system, same name) to write a file or a folder at; renamed onto
    `path` when the block ends without an error, removed otherwise. `keep_existing`: a `path` that exists by then
    (another process finished first) is kept and the scratch copy dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = scratch / path.name
    try:
        yield tmp
        if tmp.is_file():
            tmp.chmod(0o644)  # results and plots are meant to be read and committed
        if not (keep_existing and path.exists()):
            try:
                os.replace(tmp, path)
            except OSError:
                if not (keep_existing and path.exists()):  # a folder another process put there meanwhile is kept
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a scratch file beside it, renamed onto it (nothing of the write
    is left once the rename is done, so a process killed right after it leaves no scratch behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Path(scratch).write_text(text)
        os.chmod(scratch, 0o644)  # results are meant to be read and committed
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def write_with_derived(primary: Path, text: str, derived: dict[Path, str]) -> None:
    """A results file and the files made from it (its table): the old derived files are removed first, then the
    primary is written, then the derived ones, each whole. Stopped anywhere, the folder holds no derived file next
    to a primary it was not made from."""
    for path in derived:
        path.unlink(missing_ok=True)
    write_atomic(primary, text)
    for path, body in derived.items():
        write_atomic(path, body)
