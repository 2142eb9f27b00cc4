"""RoPE-integrity probe: retrieve a passkey from a controlled distance.

The key is stated, then about `distance` tokens of filler follow before the question, so the answer
depends on attending to tokens a known number of positions back. Run under
`positions=original|rerotate|naive` (model args) and across distances, it shows where a policy's
position handling breaks retrieval. (The bundled 135M model cannot copy an arbitrary word on
request, even 64 tokens back, so the probe uses the digit passkey it does retrieve.) Seeded, offline.
"""

from __future__ import annotations

import random

from kvbench.tasks.needle import ANSWER_PREFIX, FILLER, INTRO, NEEDLE, QUESTION

__all__ = ["ANSWER_PREFIX", "probes"]


def probes(tokenizer, distances: tuple[int, ...], repeats: int, seed: int) -> list[dict]:
    """One user message per (distance, repeat): the key, ~distance tokens of filler, the question."""
    rng = random.Random(seed)
    per_filler = len(tokenizer(FILLER * 20, add_special_tokens=False)["input_ids"]) / 20  # repeats merge at joins
    out = []
    for distance in distances:
        for _ in range(repeats):
            key = f"{rng.randrange(10000, 100000)}"
            filler = FILLER * max(1, round(distance / per_filler))
            out.append({"user": INTRO + NEEDLE.format(key=key) + filler + QUESTION, "answer": key,
                        "distance": distance})
    return out
