"""Run records -> a markdown leaderboard (tabulate), one row per (method, budget)."""

from __future__ import annotations

import random
from typing import Any

from tabulate import tabulate

from kvbench.evaluation.records import MIB
from kvbench.policy import Budget


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _is_perplexity(metric: str) -> bool:
    return "perplexity" in metric


def _score(value: float, metric: str) -> str:
    return _fmt(value, 2) if _is_perplexity(metric) else _fmt(100 * value, 0) + "%"


def bootstrap_halfwidth(groups: list[list[float]], resamples: int = 1000) -> float | None:
    """Half the width of a 95% percentile-bootstrap interval of the mean of the groups' means, each group resampled
    on its own (a task: one group; the suite: one per counted cell). Seeded: the same scores, the same interval."""
    if sum(len(g) for g in groups) < 2:
        return None
    rng = random.Random(0)
    means = sorted(sum(sum(rng.choices(g, k=len(g))) / len(g) for g in groups) / len(groups)
                   for _ in range(resamples))
    return (means[int(0.975 * resamples) - 1] - means[int(0.025 * resamples)]) / 2


def _with_ci(value: float | None, groups: list[list[float]]) -> str:
    half = bootstrap_halfwidth(groups) if value is not None else None
    return _pct(value) + ("" if half is None else f" ±{100 * half:.0f}")


def _task_cells(m: dict[str, Any], task: str, with_compression: bool, samples: list[float] | None) -> list[str]:
    if task not in m["accuracy"]:
        return ["–", "–"] if with_compression else ["–"]
    metric = m.get("metric", {}).get(task, "accuracy")
    cells = [_with_ci(m["accuracy"][task], [samples]) if samples else _score(m["accuracy"][task], metric)]
    if with_compression:
        cells.append(_fmt(m["kv_compression_by_task"].get(task), 3))  # a group: on its subtasks' columns
    return cells


COUNT_THRESHOLD = 0.5
"""A (task, context length) cell counts in the suite average only where the full cache scores at least this: a
cell the model fails without compression measures the model, not the method."""

Cell = tuple[str, int | None]  # (task, context length; None for a task without lengths)


NOT_PASS_FAIL = ("distinct_4grams",)
"""Metrics in [0, 1] that are not a success rate (longgen's degeneration measure): never a suite-average cell."""


def cell_scores(record: dict[str, Any]) -> dict[Cell, list[float]]:
    """A row's sample scores per (task, context length), for tasks scored per sample as success in [0, 1] (not
    perplexity, not a degeneration measure)."""
    out: dict[Cell, list[float]] = {}
    metric = record["metrics"].get("metric", {})
    for s in record["samples"]:
        name = metric.get(s["task"], "")
        if _is_perplexity(name) or name in NOT_PASS_FAIL or not isinstance(s["score"], int | float):
            continue
        out.setdefault((s["task"], (s.get("meta") or {}).get("context_length")), []).append(float(s["score"]))
    return out


def counted_cells(records: list[dict[str, Any]]) -> tuple[dict[Cell, float], dict[Cell, float]] | None:
    """The full cache's mean score per cell, split into the cells that count (>= COUNT_THRESHOLD) and those left
    out; None without a `full` row (its in-prompt row when several)."""
    fulls = [r for r in records if r["method"] == "full" and not r.get("kv_quant")]
    if not fulls:
        return None
    full = next((r for r in fulls if r.get("query", "in-prompt") == "in-prompt"), fulls[0])
    means = {c: sum(v) / len(v) for c, v in cell_scores(full).items()}
    keep = {c: m for c, m in means.items() if m >= COUNT_THRESHOLD}
    return keep, {c: m for c, m in means.items() if c not in keep}


def suite_average(record: dict[str, Any], counted: dict[Cell, float]) -> float | None:
    """The mean over counted cells of the row's mean score per cell."""
    scores = cell_scores(record)
    means = [sum(scores[c]) / len(scores[c]) for c in counted if c in scores]
    return sum(means) / len(means) if means else None


def task_samples(record: dict[str, Any]) -> dict[str, list[float]]:
    """A row's per-sample scores of each task scored per sample (for its interval and n)."""
    out: dict[str, list[float]] = {}
    for (task, _), scores in cell_scores(record).items():
        out.setdefault(task, []).extend(scores)
    return out


def rows(records: list[dict[str, Any]],
         split: tuple[dict[Cell, float], dict[Cell, float]] | None = None) -> tuple[list[str], list[list[str]]]:
    """The table's headers and cells; `split` (counted and left-out cells) defaults to the one these rows give."""
    tasks = sorted({t for r in records for t in r["metrics"]["accuracy"]})
    metric = {t: name for r in records for t, name in r["metrics"].get("metric", {}).items()}
    full = next((r for r in records if r["method"] == "full" and not r.get("kv_quant")), None)  # the model's dtype
    base = full["metrics"]["decode_ms_p50"] if full else None
    per_task = len(tasks) > 1
    labels = {t: "ppl" if _is_perplexity(metric.get(t, "")) else "acc" for t in tasks}
    per_sample = [task_samples(r) for r in records]
    counts = {t: len(ps[t]) for ps in reversed(per_sample) for t in ps}  # n of each task (the first row's)
    labels = {t: f"{label} (n={counts[t]}, ±95%)" if t in counts else label for t, label in labels.items()}
    task_cols = [f"{t} {what}" for t in tasks for what in ((labels[t], "KV comp.") if per_task else (labels[t],))]
    queries = any(r.get("query", "in-prompt") != "in-prompt" for r in records)
    quantized = any(r.get("kv_quant") for r in records)
    split = split or counted_cells(records)
    shown = {task for samples in per_sample for task in samples}
    average = split is not None and len({task for task, _ in split[0]} & shown) > 1  # a suite: several that count
    headers = ["method", "budget", "positions", "schedule", *(["query"] if queries else []),
               *(["KV quant"] if quantized else []), *task_cols,
               *(["suite avg"] if average else []), "KV compression",
               "active KV MiB", "peak KV MiB", "prefill ms", "decode ms p50", "decode ms p95", "tok/s", "decode × full",
               "policy ms/step"]
    freezing = any(r["metrics"]["freezes"] for r in records)
    if freezing:
        headers += ["mean KV comp.", "frozen MiB", "thaws", "recoveries"]
    table = []
    for r, samples in zip(records, per_sample, strict=True):
        m = r["metrics"]
        same_host = full is not None and r.get("hosts") == full.get("hosts") and len(r.get("hosts") or [""]) == 1
        ratio = m["decode_ms_p50"] / base if base and m["decode_ms_p50"] and same_host else None
        cells = cell_scores(r)
        table.append([
            f"{r['method']} {r['variant']}".strip(), Budget.label(r["budget"]), r.get("positions", "original"),
            r.get("schedule") or "–",
            *([r.get("query", "in-prompt")] if queries else []),
            *([r.get("kv_quant") or "–"] if quantized else []),
            *(cell for t in tasks for cell in _task_cells(m, t, per_task, samples.get(t))),
            *([_with_ci(suite_average(r, split[0]), [cells[c] for c in split[0] if c in cells])] if average else []),
            _fmt(m["kv_compression"], 3), _fmt(m["active_kv_bytes"] / MIB, 2), _fmt(m["peak_kv_bytes"] / MIB, 2),
            _fmt(m["prefill_ms"], 0), _fmt(m["decode_ms_p50"]),
            _fmt(m["decode_ms_p95"]), _fmt(m["tokens_per_s"]), _fmt(ratio, 2),
            _fmt(m["policy_ms_per_decode_step"]),  # None ("–") when the row decoded nothing (loglikelihood only)
        ])
        if freezing:
            recoveries = sum(m["policy"].get("recoveries", {}).values())
            table[-1] += [_fmt(m["mean_kv_compression"], 3), _fmt(m["frozen_kv_bytes"] / MIB, 2),
                          str(m["thaws"]), str(recoveries)]
    return headers, table


QUERY_TITLES = {"in-prompt": "Question inside the compressed prompt (in-prompt)",
                "after": "Question after its context was compressed (after)",
                "reuse": "Several questions on one compressed context (reuse)"}


def tables(records: list[dict[str, Any]]) -> str:
    """One table per query mode (rows of one mode run the same tasks, so their suite averages compare), each under
    its heading when there are several; the cells that count come from the full cache's in-prompt row."""
    modes = list(dict.fromkeys(r.get("query", "in-prompt") for r in records))
    if len(modes) <= 1:
        headers, table = rows(records)
        return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)
    split = counted_cells(records)
    parts = []
    for mode in modes:
        headers, table = rows([r for r in records if r.get("query", "in-prompt") == mode], split)
        parts += [f"### {QUERY_TITLES.get(mode, mode)}", "",
                  tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(parts).rstrip()


def markdown(records: list[dict[str, Any]], title: str | None = None) -> str:
    body = tables(records)
    if not records:
        return body + "\n"
    v = records[0]["versions"]
    c = records[0]["config"]
    head = [f"# {title}", ""] if title else []
    head.append(
        f"Model `{c['model']}` · attention `{c['attention']}` · prefill chunk {c['prefill_chunk']} · "
        f"{v.get('device')} · torch {v.get('torch')} · transformers {v.get('transformers')} · "
        f"kvbench {v.get('kvbench')}"
    )
    notes = [
        "",
        "Schedule = when the method's decisions apply: once after the prompt (prompt), after every prefill chunk "
        "(chunk), or also at every decode step (decode). "
        "KV compression = 1 − active/full KV bytes at the end of each sample (mean); peak KV = high-water "
        "mark of active KV over the run (max); decode × full = decode ms p50 over the `full` row's, same run and "
        "machine (– where a row's timings come from another machine than the `full` row's); "
        "policy ms/step = mean host time per decode step the method spends deciding and moving rows after attention "
        "(part of decode ms: what its smaller attention has to pay for).",
    ]
    split = counted_cells(records)
    if split is not None and split[1]:
        left = ", ".join(f"{t}" + (f" @ {n}" if n else "") + f" (full {100 * m:.0f}%)" for (t, n), m in sorted(
            split[1].items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))
        notes.append(f"\nCells the full cache itself fails (below {100 * COUNT_THRESHOLD:.0f}%), left out of the "
                     f"suite average: {left}.")
    return "\n".join([*head, "", body, *notes]) + "\n"
