"""Multi-turn stateful probe (the protocol of arXiv 2511.04686): one cache across a long conversation.

Each user turn brings a new passage of real English (CPython's pydoc topics, shipped with Python)
holding a 5-digit code, and asks for that code. The conversation keeps growing through the policy,
so later turns run at positions approaching and then passing the model's trained window (8k for
SmolLM2); a policy that scrambles positions shows up as wrong answers in late turns. Seeded: the same
seed gives the same passages and codes.
"""

from __future__ import annotations

import random
import re

from kvbench.tasks.prose import passages

QUESTION = "What is the code of this passage? Answer with the number only."


def conversations(count: int, turns: int, words_per_turn: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """`count` conversations of `turns` user messages (passage with a hidden code + question) and their codes."""
    rng = random.Random(seed)
    pool = passages(words_per_turn)
    out = []
    for _ in range(count):
        chosen = rng.sample(pool, turns)
        codes = [str(rng.randrange(10000, 100000)) for _ in chosen]
        messages = []
        for text, code in zip(chosen, codes, strict=True):
            words = text.split()
            at = rng.randrange(len(words) // 4, 3 * len(words) // 4)
            body = " ".join([*words[:at], f"The code of this passage is {code}.", *words[at:]])
            messages.append(f"{body}\n\n{QUESTION}")
        out.append((messages, codes))
    return out


def score_turn(prediction: str, answer: str) -> float:
    """1 when the first number in the reply is the passage's code."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) == answer)
