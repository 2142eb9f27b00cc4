"""Built-in tasks: deterministic, offline generators plus a scorer, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from kvbench.tasks.base import Sample, Task
from kvbench.tasks.longgen import LongGenTask
from kvbench.tasks.multiturn import MultiTurnTask
from kvbench.tasks.needle import NeedleTask

TASKS: dict[str, Callable[..., Task]] = {
    "needle": partial(NeedleTask, name="needle"),
    "needle-1k": partial(NeedleTask, name="needle-1k", context_lengths=(1024,)),
    "needle-2k": partial(NeedleTask, name="needle-2k", context_lengths=(2048,)),
    "longgen": LongGenTask,
    "multiturn": MultiTurnTask,
}


def make_task(name: str, **options) -> Task:
    """Build a registered task; `options` override its defaults (e.g. context_lengths)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    fields = getattr(factory, "func", factory).__dataclass_fields__
    return factory(**{k: v for k, v in options.items() if k in fields})


__all__ = ["TASKS", "Sample", "Task", "make_task"]
