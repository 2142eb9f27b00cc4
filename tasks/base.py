"""What a built-in task provides to `kvbench compare`: prompts, generation limits and a scorer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Sample:
    id: str
    prompt_ids: tuple[int, ...]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    max_new_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool  # generate exactly max_new_tokens (long-generation tasks)

    def samples(self, engine, limit: int | None = None) -> list[Sample]: ...

    def score(self, prediction: str, sample: Sample) -> float: ...
