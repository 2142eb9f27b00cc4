"""Long free generation from short prompts: the paper's memory test for ASR-KF-EGR (tasks/lm_eval/longgen.yaml).

There is no gold answer. The score is the share of distinct word 4-grams in the continuation, a
degeneration check: a cache policy that breaks the model shows up as loops and repetition.
"""

from __future__ import annotations

PROMPTS = (
    "Write a long story about a dragon who learns to bake bread in a small village.",
    "Explain in detail how a steam engine works, from the fire to the wheels.",
    "Describe a day in the life of a lighthouse keeper on a stormy island.",
    "Write a long letter from a sailor to his family about a voyage around the world.",
)


def distinct_ngrams(text: str, n: int = 4) -> float:
    """Share of distinct word n-grams: near 1 for fluent text, low for loops and repetition."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
