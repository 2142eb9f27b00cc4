"""kvbench's lm-eval tasks (tasks/lm_eval/*.yaml) found without `--include_path`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

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


class _TaskLoader(yaml.SafeLoader):
    """Reads kvbench's task YAMLs without lm-eval: `!function` tags become their text."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))

PROPORTIONS = {"depths"}  # metadata lists of shares in [0, 1]
MAY_BE_EMPTY = {"varied_context_lengths"}  # metadata lists that may be empty (that part of a task left out)
FROM_ZERO = {"seed"}  # whole numbers that may be 0; every other whole number must be positive
SWITCHES = {"exact_lengths"}  # 0 (off) or 1 (on)


def _yaml(name: str) -> dict[str, Any]:
    path = next((p for p in (TASK_DIR / f"{name}.yaml", TASK_DIR / name) if p.is_file()), None)
    return yaml.load(path.read_text(), Loader=_TaskLoader) if path else {}


def metadata_defaults(task: str) -> dict[str, Any] | None:
    """The metadata a kvbench lm-eval task (or group: its members') takes, with the YAML's defaults; None for a
    name that is not one of kvbench's task files."""
    config = _yaml(task)
    if not config:
        return None
    if "group" in config:
        merged: dict[str, Any] = {}
        for member in config.get("task", []):
            merged |= metadata_defaults(member) or {}
        return merged
    meta = {**(_yaml(config["include"]).get("metadata", {}) if "include" in config else {}),
            **config.get("metadata", {})}
    meta.pop("version", None)
    return meta


def query_modes(task: str) -> tuple[str, ...] | None:
    """The query placements a kvbench task (or group: all its members) can be computed in: every mode when its data
    function marks the question (`kvbench.tasks.marks_question`), else in-prompt alone (a rolling-loglikelihood task
    scores a whole text: there is no question to move); None for a name that is not one of kvbench's tasks."""
    from kvbench.runtime.engine import QUERY_MODES
    from kvbench.tasks.lm_eval import utils

    config = _yaml(task)
    if not config:
        return None
    if "group" in config:
        members = [query_modes(m) or () for m in config.get("task", [])]
        return tuple(q for q in QUERY_MODES if all(q in m for m in members))
    merged = {**(_yaml(config["include"]) if "include" in config else {}), **config}
    data = getattr(utils, str(merged.get("custom_dataset", "")).removeprefix("utils."), None)
    marked = getattr(data, "marks_question", False) and merged.get("output_type") != "loglikelihood_rolling"
    return QUERY_MODES if marked else ("in-prompt",)


def check_metadata(task: str, meta: Any, where: str) -> None:
    """Refuse, naming what is allowed, task metadata a task does not take or cannot use: an unknown key, a value of
    another type than the YAML's default, a length, count or distance below 1, a depth outside [0, 1]."""
    defaults = metadata_defaults(task)
    if defaults is None:
        raise ValueError(f"{where}: {task!r} is not one of kvbench's lm-eval tasks; task metadata applies to those")
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: must be a table of settings, got {meta!r}")
    unknown = sorted(set(meta) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown setting {', '.join(unknown)}; {task} takes: {', '.join(sorted(defaults))}")
    for key, value in meta.items():
        default, low = defaults[key], 0 if key in FROM_ZERO else 1
        if isinstance(default, list):
            numbers = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                      for v in value)
            if key in PROPORTIONS:
                ok = numbers and bool(value) and all(0 <= v <= 1 for v in value)
                allowed = "a non-empty list of numbers in [0, 1]"
            else:
                ok = numbers and (bool(value) or key in MAY_BE_EMPTY) and all(
                    isinstance(v, int) and v >= low for v in value)
                allowed = f"a {'' if key in MAY_BE_EMPTY else 'non-empty '}list of whole numbers >= {low}"
        elif key in SWITCHES:
            ok, allowed = isinstance(value, int) and not isinstance(value, bool) and value in (0, 1), "0 or 1"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            allowed = f"a whole number >= {low}"
        if not ok:
            raise ValueError(f"{where}: {key} = {value!r} is not {allowed}")
