"""Passkey retrieval: a 5-digit key hidden at a given depth of repetitive filler text.

Seeded and offline: the same seed gives the same keys, depths and prompts. The answer prefix
("The pass key is:") is part of the prompt, so the model only has to copy the digits; a sample
scores 1 when the first number it produces is the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvbench.tasks.base import Sample

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is:"


@dataclass
class NeedleTask:
    context_lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0
    name: str = "needle"
    max_new_tokens: int = 8
    stop: tuple[str, ...] = ("\n",)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
        if any(c < 128 for c in self.context_lengths):
            raise ValueError(f"needle context lengths must be at least 128 tokens, got {self.context_lengths}")

    def samples(self, engine, limit: int | None = None) -> list[Sample]:
        rng = random.Random(self.seed)
        tok = engine.tokenizer
        per_filler = len(tok(FILLER, add_special_tokens=False)["input_ids"])
        frame = len(engine.encode_chat(INTRO + NEEDLE.format(key="00000") + QUESTION, ANSWER_PREFIX))
        out = []
        for length in self.context_lengths:
            reps = max(1, (length - frame) // per_filler)
            for depth in self.depths:
                key = f"{rng.randrange(10000, 100000)}"
                at = round(reps * depth)
                haystack = FILLER * at + NEEDLE.format(key=key) + FILLER * (reps - at)
                ids = engine.encode_chat(INTRO + haystack + QUESTION, ANSWER_PREFIX)
                meta = {"context_length": length, "depth": depth, "prompt_tokens": len(ids)}
                out.append(Sample(f"needle-{length}-{depth:.2f}", tuple(ids), key, meta))
        return out[:limit] if limit else out

    def score(self, prediction: str, sample: Sample) -> float:
        found = re.search(r"\d+", prediction)
        return float(found is not None and found.group(0) == sample.answer)
