"""kvbench's lm-eval tasks (tasks/lm_eval/*.yaml) found without `--include_path`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

TASK_DIR = Path(str(files("kvbench.tasks") / "lm_eval"))


def install_task_path(tasks_module) -> None:
    """Make lm-eval's TaskManager index kvbench's task folder in addition to its own."""
    manager = tasks_module.TaskManager
    if getattr(manager, "_kvbench", False):
        return
    original = manager.__init__

    def init(self, *args, include_path=None, **kwargs):
        if include_path is None:
            paths = []
        else:
            paths = [include_path] if isinstance(include_path, str | Path) else list(include_path)
        if str(TASK_DIR) not in map(str, paths):
            paths.append(str(TASK_DIR))
        original(self, *args, include_path=paths, **kwargs)

    manager.__init__ = init
    manager._kvbench = True
