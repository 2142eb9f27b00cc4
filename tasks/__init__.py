"""Offline, seeded data generators for kvbench's tasks. A task is defined once, by its lm-eval YAML in
`tasks/lm_eval/` (which prompts, which metric, generation limits); the modules here only generate its data:
`needle` (passkey haystacks), `rope` (copying at controlled distances), `multiturn` (conversations with a code per
turn), `longgen` (long-generation prompts), `ruler` (the RULER-style suite), `prose` (the pydoc prose they use)."""

from collections.abc import Callable, Iterable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

ANSWER_ROOM = 128
"""Positions of the model's window a task's context length must leave free for its answer: the most any kvbench
task generates (RULER's common-words list, 120 tokens), rounded up."""


def marks_question(data: F) -> F:
    """Declares that a task data function's docs mark where their question starts (a `question` field holding its
    exact text in the prompt), so the task can be run with the question after its compressed context
    (`query=after|reuse`). A task without it runs in-prompt only, and the other modes are refused before any work."""
    data.marks_question = True
    return data


class TaskSettingsError(ValueError):
    """A task setting the evaluated model cannot take (the `lm_eval` command reports it in one line, exit 2)."""


def check_window(task: str, lengths: Iterable[int], window: int | None, model: str) -> None:
    """Refuse context lengths whose prompt and answer would not fit the model's window (`window`: its
    max_position_embeddings; None or 0 when it states none), naming the longest length that fits."""
    if not window:
        return
    past = sorted({int(n) for n in lengths if int(n) + ANSWER_ROOM > window})
    if past:
        raise TaskSettingsError(f"{task}: context length {', '.join(map(str, past))} does not fit {model}'s window "
                                f"of {window} positions with room for the answer ({ANSWER_ROOM} tokens); lengths up "
                                f"to {window - ANSWER_ROOM} fit")
