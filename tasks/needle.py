"""Passkey retrieval: a 5-digit key hidden at a given depth of repetitive filler text.

Seeded and offline: the same seed gives the same keys, depths and prompts. The answer prefix
("The pass key is:") is part of the prompt, so the model only has to copy the digits; a sample
scores 1 when the first number it produces is the key (tasks/lm_eval/kvbench_needle.yaml).
"""

from __future__ import annotations

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
             fillers: tuple[str, ...], prompt_tokens: Callable[[str], int]) -> list[dict]:
    """The user message of every (filler, length, depth) cell and its key, sized so the whole prompt
    (`prompt_tokens` counts it, chat template included) is about `length` tokens. "simple" repeats
    one filler paragraph; "varied" is real prose (CPython's pydoc topics)."""
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
                at = round(reps * depth)
                text = "".join(units[:at]) + NEEDLE.format(key=key) + "".join(units[at:reps])
                out.append({"user": INTRO + text + QUESTION, "answer": key, "context_length": length,
                            "depth": depth, "filler": filler})
    return out
