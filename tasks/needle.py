"""Passkey retrieval: a 5-digit key hidden at a given depth of repetitive filler text.

Seeded and offline: the same seed gives the same keys, depths and prompts. The answer prefix
("The pass key is:") is part of the prompt, so the model only has to copy the digits; a sample
scores 1 when the first number it produces is the key (tasks/lm_eval/kvbench_needle.yaml).
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Callable

from kvbench.tasks import TaskSettingsError

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is:"


def haystack(tokenizer, lengths: tuple[int, ...], depths: tuple[float, ...], seed: int,
             fillers: tuple[str, ...], prompt_tokens: Callable[[str], int], exact: bool = False) -> list[dict]:
    """The user message of every (filler, length, depth) cell and its key, sized so the whole prompt
    (`prompt_tokens` counts it, chat template included) is about `length` tokens, or with `exact` the longest
    at most `length` that whole filler units and then words of the next unit make. "simple" repeats one filler
    paragraph; "varied" is real prose (CPython's pydoc topics)."""
    from kvbench.tasks.prose import passages

    rng = random.Random(seed)
    frame = prompt_tokens(INTRO + NEEDLE.format(key="00000") + QUESTION)
    out = []
    for filler in fillers:
        if filler not in ("simple", "varied"):
            raise ValueError(f"needle filler {filler!r}; allowed: simple, varied")
        if filler == "simple":
            units = [FILLER] * 4000
            per_unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
        else:
            units = [p + ". " for p in " ".join(passages(400)).split(". ")]
            per_unit = len(tokenizer("".join(units[:200]), add_special_tokens=False)["input_ids"]) / 200
        for length in lengths:
            if length < frame + per_unit:  # the frame alone, recorded as `length`, would be a wrong number
                raise TaskSettingsError(f"needle: context length {length} is shorter than its prompt with one unit of "
                                        f"{filler} filler ({math.ceil(frame + per_unit)} tokens in this model); the "
                                        f"shortest length is {math.ceil(frame + per_unit)}")
            reps = max(1, int((length - frame) // per_unit))
            for depth in depths:
                key = f"{rng.randrange(10000, 100000)}"
                user = functools.partial(_user, units, key, depth)
                text = fitted(user, reps, length, prompt_tokens) if exact else user(reps)
                out.append({"user": text, "answer": key, "context_length": length,
                            "depth": depth, "filler": filler})
    return out


def _user(units: list[str], key: str, depth: float, reps: int, words: int = 0) -> str:
    """The user message with `reps` filler units, the needle at `depth` of them, then `words` words of the next."""
    at = round(reps * depth)
    tail = " ".join(units[reps].split(" ")[:words]) if words and reps < len(units) else ""
    return INTRO + "".join(units[:at]) + NEEDLE.format(key=key) + "".join(units[at:reps]) + tail + QUESTION


def fitted(user: Callable[..., str], reps: int, length: int, prompt_tokens: Callable[[str], int]) -> str:
    """The longest `user(reps, words)` whose prompt is at most `length` tokens: whole units first (stepping from
    the estimate `reps`), then words of the next unit, so it falls short by less than one word's tokens. Refused
    when the filler runs out more than 1% short of `length` (the sample would be recorded at a length it is not)."""
    while reps > 1 and prompt_tokens(user(reps)) > length:
        reps -= 1
    if prompt_tokens(user(reps)) > length:
        raise TaskSettingsError(f"needle: no prompt with one filler unit fits {length} tokens in this model; give a "
                                "longer context length")
    while user(reps + 1) != user(reps) and prompt_tokens(user(reps + 1)) <= length:
        reps += 1
    high = 1  # words of the next unit: a count that does not fit (all its words make one more unit)
    while user(reps, high) != user(reps, high // 2) and prompt_tokens(user(reps, high)) <= length:
        high *= 2
    words = bisect.bisect_right(range(high), False, key=lambda w: prompt_tokens(user(reps, w)) > length) - 1
    text = user(reps, words)
    if prompt_tokens(text) < 0.99 * length:
        raise TaskSettingsError(f"needle: the filler makes at most {prompt_tokens(text)} tokens, short of {length}; "
                                "give a shorter context length")
    return text
