"""The tables of README.md from this folder's results files (kvbench results schema 1: results.json, the first run,
and 075/results.json, the second budget of the methods the first run did not reach; or the files named, e.g.
4k/results.json):
1. the full cache per (task, context length) in both query modes, with n, and whether the cell counts;
2. every method row side by side in both query modes: the suite average over counted cells (95% bootstrap
   interval), the change from in-prompt to after, and the mean KV compression;
3. per counted cell, each row's in-prompt and after scores.
    .venv/bin/python reports/ruler/table.py > reports/ruler/tables.md
    .venv/bin/python reports/ruler/table.py reports/ruler/4k/results.json > reports/ruler/tables-4k.md
A method's rows (its budgets, its variants) are listed together, in the order the method first appears.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from kvbench.evaluation import results
from kvbench.evaluation.leaderboard import bootstrap_halfwidth, cell_scores, counted_cells, suite_average
from kvbench.policy import Budget

QUERIES = ("in-prompt", "after")


def label(r: dict) -> str:
    return " ".join(p for p in (r["method"], r["variant"], Budget.label(r["budget"]) if r["budget"] else "") if p)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def main(paths: list[Path]) -> None:
    records = [r for path in paths for r in results.load(path, "table.py")["records"]]
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r["method"], i)
    records.sort(key=lambda r: first[r["method"]])  # stable: within a method, the files' order
    counted, left_out = counted_cells(records)
    cells = sorted(set(counted) | set(left_out))
    fulls = {r["query"]: cell_scores(r) for r in records if r["method"] == "full"}
    print("### The full cache\n")
    print(tabulate([[t.removeprefix("kvbench_ruler_"), n,
                     *(f"{pct(statistics.fmean(fulls[q][(t, n)]))} (n={len(fulls[q][(t, n)])})"
                       if (t, n) in fulls.get(q, {}) else "–" for q in QUERIES),
                     "yes" if (t, n) in counted else "no"] for t, n in cells],
                   headers=["task", "tokens", *QUERIES, "counts"], tablefmt="github"))

    rows: dict[str, dict[str, dict]] = {}
    for r in records:
        rows.setdefault(label(r), {})[r["query"]] = r
    print(f"\n### Suite average over the {len(counted)} counted cells a row ran\n")
    table = []
    for name, by_query in rows.items():
        averages = []
        line = [name, next(iter(by_query.values()))["schedule"] or "–"]
        for q in QUERIES:
            r = by_query.get(q)
            if r is None:
                averages.append(None)
                line.append("–")
                continue
            scores = cell_scores(r)
            ran = [c for c in counted if c in scores]
            average = suite_average(r, counted)
            half = bootstrap_halfwidth([scores[c] for c in ran])
            averages.append(average)
            line.append(f"{pct(average)} ±{100 * half:.0f} (n={sum(len(scores[c]) for c in ran)})"
                        if half is not None else pct(average))
        delta = averages[1] - averages[0] if None not in averages else None
        line.append("–" if delta is None else f"{100 * delta:+.0f}")
        line.append(f"{statistics.fmean(r['metrics']['kv_compression'] for r in by_query.values()):.2f}")
        table.append(line)
    print(tabulate(table, headers=["row", "schedule", *QUERIES, "after − in-prompt", "KV compression"],
                   tablefmt="github"))

    print("\n### Per counted cell: in-prompt / after\n")
    ran = [c for c in sorted(counted) if any(c in cell_scores(r) for r in records if r["method"] != "full")]
    print(tabulate([[name, *("/".join(pct(statistics.fmean(cell_scores(by_query[q])[c]))
                                       if q in by_query and c in cell_scores(by_query[q]) else "–"
                                       for q in QUERIES) for c in ran)]
                    for name, by_query in rows.items()],
                   headers=["row", *(f"{t.removeprefix('kvbench_ruler_')} {n}" for t, n in ran)], tablefmt="github"))


if __name__ == "__main__":
    here = Path(__file__).parent
    main([Path(a) for a in sys.argv[1:]] or [here / "results.json", here / "075" / "results.json"])
