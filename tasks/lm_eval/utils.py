"""Offline data for kvbench's lm-eval tasks: generated with the same seeded generators as the built-in
tasks and rendered with the bundled model's chat template (lm-eval gets plain strings)."""

from __future__ import annotations

import datasets

from kvbench import models
from kvbench.tasks.needle import ANSWER_PREFIX, haystack


def _chat(tokenizer, user: str, prefix: str = "") -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True) + prefix
    return user + "\n" + prefix


def needle(metadata: dict | None = None, **kwargs) -> dict[str, datasets.Dataset]:
    """Simple filler at ~1k/2k/4k and varied prose at ~1k, x depth 0.1..0.9; seeded. Varied prose stops at
    1k by default: with the full cache the 135M model then finds only late needles (2k: 1/5, 4k: 2/5)."""
    meta = metadata or {}
    tokenizer = models.load_tokenizer(meta.get("tokenizer", models.DEFAULT_MODEL))

    def count(user: str) -> int:
        return len(tokenizer(_chat(tokenizer, user, ANSWER_PREFIX), add_special_tokens=False)["input_ids"])

    rows = []
    depths = tuple(meta.get("depths", (0.1, 0.3, 0.5, 0.7, 0.9)))
    seed = int(meta.get("seed", 0))
    cells = [("simple", tuple(meta.get("context_lengths", (1024, 2048, 4096)))),
             ("varied", tuple(meta.get("varied_context_lengths", (1024,))))]
    for i, (filler, lengths) in enumerate(cells):
        for sample in haystack(tokenizer, lengths, depths, seed + i, (filler,), count):
            rows.append({"prompt": _chat(tokenizer, sample["user"], ANSWER_PREFIX), "answer": sample["answer"],
                         "context_length": sample["context_length"], "depth": sample["depth"],
                         "filler": sample["filler"]})
    return {"test": datasets.Dataset.from_list(rows)}




def ppl(metadata: dict | None = None, **kwargs) -> dict[str, datasets.Dataset]:
    """Documents of real English (CPython's pydoc topics, shipped with Python), `words` words each."""
    from kvbench.tasks.multiturn import passages

    meta = metadata or {}
    docs = passages(int(meta.get("words", 1200)))[: int(meta.get("documents", 8))]
    return {"test": datasets.Dataset.from_list([{"text": d} for d in docs])}


def rope(metadata: dict | None = None, **kwargs) -> dict[str, datasets.Dataset]:
    """Secret-word copying at controlled distances (tokens between the fact and the question)."""
    from kvbench.tasks.rope import ANSWER_PREFIX as ROPE_PREFIX
    from kvbench.tasks.rope import probes

    meta = metadata or {}
    tokenizer = models.load_tokenizer(meta.get("tokenizer", models.DEFAULT_MODEL))
    rows = [{"prompt": _chat(tokenizer, p["user"], ROPE_PREFIX), "answer": p["answer"], "distance": p["distance"]}
            for p in probes(tokenizer, tuple(meta.get("distances", (64, 512, 2048, 6144))),
                            int(meta.get("repeats", 5)), int(meta.get("seed", 0)))]
    return {"test": datasets.Dataset.from_list(rows)}
