"""Per-turn accuracy of a `multiturn` run, bucketed by how far into the conversation a turn sits.

    python reports/positions/per_turn.py reports/positions/results.json > reports/positions/per_turn.md

Turn positions are counted with the bundled tokenizer over the conversation as the `full` row saw it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from tabulate import tabulate

from kvbench.runtime import models
from kvbench.runtime.chat import _turn_ids
from kvbench.runtime.engine import Engine
from kvbench.tasks.multiturn import conversations, score_turn


def turn_ends(engine: Engine, turns: list[str], replies: list[str]) -> list[int]:
    """Tokens seen when each turn's answer starts, for one conversation."""
    messages, ends, seen = [], [], 0
    for turn, reply in zip(turns, replies, strict=True):
        seen += len(_turn_ids(engine, messages, turn, []))
        ends.append(seen)
        seen += len(engine.tokenizer(reply)["input_ids"]) + 1
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": reply}]
    return ends


def main(path: str) -> None:
    with open(path) as fh:
        records = json.load(fh)
    model, tok = models.load()
    engine = Engine(model, tok)
    talks = {f"multiturn-{c}": turns for c, (turns, _) in enumerate(conversations(2, 24, 260, 0))}  # the run's task
    full = next(r for r in records if r["method"] == "full")
    ends = {s["id"]: turn_ends(engine, talks[s["id"]], s["prediction"].split("|")) for s in full["samples"]}
    buckets = [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192), (8192, 10**9)]
    headers = ["method", "budget", "positions", *(f"{a // 1024}k–{b // 1024}k" if b < 10**9 else f">{a // 1024}k"
                                                 for a, b in buckets), "all turns"]
    rows = []
    for r in records:
        hits: dict[int, list[float]] = defaultdict(list)
        for s in r["samples"]:
            for pred, gold, end in zip(s["prediction"].split("|"), s["answer"].split("|"), ends[s["id"]], strict=True):
                b = next(i for i, (lo, hi) in enumerate(buckets) if lo <= end < hi)
                hits[b].append(score_turn(pred, gold))
        cells = [f"{100 * sum(hits[i]) / len(hits[i]):.0f}% ({len(hits[i])})" if hits[i] else "–"
                 for i in range(len(buckets))]
        overall = [x for v in hits.values() for x in v]
        rows.append([r["method"], r["budget"] or "all", r.get("positions", "original"), *cells,
                     f"{100 * sum(overall) / len(overall):.0f}%"])
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print("\nEach cell: accuracy of the turns whose answer starts in that range of conversation tokens "
          "(number of turns in parentheses, over all conversations).")


if __name__ == "__main__":
    main(sys.argv[1])
