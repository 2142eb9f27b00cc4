"""Run records -> a markdown leaderboard (tabulate), one row per (method, budget)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from kvbench.evaluation import deployment
from kvbench.evaluation.check import row_key
from kvbench.evaluation.deployment import BATCH_CONTEXT, GIB, KV_CAP
from kvbench.evaluation.evidence import Paired, Scores, bootstrap_interval, paired, points, separable, tiers
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


def bootstrap_halfwidth(groups: list[list[float]]) -> float | None:
    """Half the width of the 95% bootstrap interval of the mean of the groups' means (`evidence.bootstrap_interval`)."""
    interval = bootstrap_interval(groups)
    return None if interval is None else (interval[1] - interval[0]) / 2


def _with_ci(value: float | None, groups: list[list[float]]) -> str:
    half = bootstrap_halfwidth(groups) if value is not None else None
    return _pct(value) + ("" if half is None else f" ±{100 * half:.0f}")


def _task_cell(m: dict[str, Any], task: str, samples: list[float] | None) -> str:
    if task not in m["accuracy"]:
        return "–"
    metric = m.get("metric", {}).get(task, "accuracy")
    return _with_ci(m["accuracy"][task], [samples]) if samples else _score(m["accuracy"][task], metric)


def task_name(task: str) -> str:
    """A task in a header or a note: its lm-eval name without the `kvbench_` every suite task has."""
    return task.removeprefix("kvbench_")


def shown_tasks(records: list[dict[str, Any]], tasks: list[str] | None = None) -> list[str]:
    """The tasks that get a column: those some row besides the full cache ran. A task only `full` ran (a RULER task
    it fails, which the methods skip) would be a column of dashes; the note under the tables lists its cells. All
    of them in a table of the full cache alone."""
    full = _reference(records)
    tasks = tasks if tasks is not None else sorted({t for r in records for t in r["metrics"]["accuracy"]})
    others = {t for r in records if r is not full for t in r["metrics"]["accuracy"]}
    return [t for t in tasks if t in others] if others else tasks


COUNT_THRESHOLD = 0.5
"""A (task, context length) cell counts in the suite average only where the full cache scores at least this: a
cell the model fails without compression measures the model, not the method."""

Cell = tuple[str, int | None]  # (task, context length; None for a task without lengths)


NOT_PASS_FAIL = ("distinct_4grams",)
"""Metrics in [0, 1] that are not a success rate (longgen's degeneration measure): never a suite-average cell."""


def sample_scores(record: dict[str, Any]) -> dict[Cell, Scores]:
    """A row's sample scores by sample id per (task, context length), for tasks scored per sample as success in
    [0, 1] (not perplexity, not a degeneration measure)."""
    out: dict[Cell, Scores] = {}
    metric = record["metrics"].get("metric", {})
    for s in record["samples"]:
        name = metric.get(s["task"], "")
        if _is_perplexity(name) or name in NOT_PASS_FAIL or not isinstance(s["score"], int | float):
            continue
        out.setdefault((s["task"], (s.get("meta") or {}).get("context_length")), {})[s["id"]] = float(s["score"])
    return out


def cell_scores(record: dict[str, Any]) -> dict[Cell, list[float]]:
    """`sample_scores` without the ids."""
    return {cell: list(scores.values()) for cell, scores in sample_scores(record).items()}


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


def _flat(scores: dict[Cell, Scores], cells: set[Cell] | None = None, task: str | None = None) -> Scores:
    """The samples of some cells (those in `cells`, or all of `task`'s) as one group, by task and id: a paired
    comparison resamples them together (strata of 3 samples would make a percentile bootstrap overconfident)."""
    return {f"{c[0]}/{i}": v for c, own in scores.items() if (c in cells if cells is not None else c[0] == task)
            for i, v in own.items()}


def ranking(records: list[dict[str, Any]], split: tuple[dict[Cell, float], dict[Cell, float]] | None
            ) -> tuple[list[int], list[str]] | None:
    """The rows best first by their paired difference to the full cache on the counted cells of the tasks shown, and
    each one's rank: a row ties with the first row of its tier unless the samples separate them (`evidence.tiers`);
    `=` marks a tie. None without a full row or a counted cell the rows share."""
    full = _reference(records)
    split = split or counted_cells(records)
    if full is None or split is None:
        return None
    scores = [sample_scores(r) for r in records]
    shown = {c for s in scores for c in s}
    cells = set(split[0]) & shown
    flat = [_flat(s, cells) for s in scores]
    against = [paired(flat[records.index(full)], f) for f in flat]
    if all(a is None for a in against):
        return None
    order = sorted(range(len(records)), key=lambda i: -against[i].delta if against[i] else float("inf"))
    ranked = [i for i in order if against[i] is not None]
    rank = tiers(ranked, lambda a, b: paired(flat[a], flat[b]))
    labels = {i: str(k) + ("=" if rank.count(k) > 1 else "") for i, k in zip(ranked, rank, strict=True)}
    return order, [labels.get(i, "–") for i in order]


def _reference(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rows' `full` in the model's dtype: what KV compression, decode × full and the paired columns refer to."""
    return next((r for r in records if r["method"] == "full" and not r.get("kv_quant")), None)


Head = list[tuple[str, Callable[[dict[str, Any]], str]]]
"""The columns that name a row: header and value."""


def _head(records: list[dict[str, Any]]) -> Head:
    """Method, budget and schedule always; the position mode, query mode and KV storage where some row leaves the
    default (original positions, the question in the prompt, the model's dtype)."""
    head: Head = [("method", lambda r: f"{r['method']} {r['variant']}".strip()),
                  ("budget", lambda r: Budget.label(r["budget"]))]
    if any(r.get("positions", "original") != "original" for r in records):
        head.append(("positions", lambda r: r.get("positions", "original")))
    head.append(("schedule", lambda r: r.get("schedule") or "–"))
    if any(r.get("query", "in-prompt") != "in-prompt" for r in records):
        head.append(("query", lambda r: r.get("query", "in-prompt")))
    if any(r.get("kv_quant") for r in records):
        head.append(("KV quant", lambda r: r.get("kv_quant") or "–"))
    return head


def paired_rows(records: list[dict[str, Any]],
                split: tuple[dict[Cell, float], dict[Cell, float]] | None = None
                ) -> tuple[list[str], list[list[str]]] | None:
    """Per row and task scored per sample (and the suite's counted cells): the row against the full cache on the
    same samples (`evidence.Paired.label`). None without a full row or such a task."""
    full = _reference(records)
    if full is None:
        return None
    split = split or counted_cells(records)
    reference = sample_scores(full)
    tasks = shown_tasks(records, sorted({task for r in records for task, _ in sample_scores(r)}))
    if not tasks:
        return None
    counted = set(split[0]) if split else set()
    suite = len({task for task, _ in counted} & set(tasks)) > 1
    head = _head(records)
    headers = [*(h for h, _ in head), *(_paired_header(t, len(_flat(reference, task=t))) for t in tasks),
               *([_paired_header("suite", len(_flat(reference, counted)))] if suite else [])]
    table = []
    for r in records:
        own = sample_scores(r)
        per = [paired(_flat(reference, task=t), _flat(own, task=t)) for t in tasks]
        if suite:
            per.append(paired(_flat(reference, counted), _flat(own, counted)))
        table.append([*(value(r) for _, value in head), *("reference" if r is full else _paired_cell(x) for x in per)])
    return _ranked(headers, table, records, split)


def deployment_rows(records: list[dict[str, Any]],
                    split: tuple[dict[Cell, float], dict[Cell, float]] | None = None
                    ) -> tuple[str, list[str], list[list[str]]] | None:
    """What each row's measured bytes buy (`deployment`): the fraction of full's KV it keeps at the end and at its
    peak, the longest context and the largest batch that fit `KV_CAP` at its peak fraction, the decode speed-up its
    bytes allow at batch 1 next to the measured one, and (reuse) the questions after which it has paid for its
    prefill; ranked as the main table. With the model's shape line; None without a full row that records the model's
    shape."""
    full = _reference(records)
    if full is None or "model_shape" not in full:
        return None
    shape = deployment.ModelShape(**full["model_shape"])
    f = full["metrics"]
    head = _head(records)
    reuse = any(r.get("query") == "reuse" for r in records)
    headers = [*(h for h, _ in head), "KV kept (end)", "KV kept (peak)",
               f"longest context @ {KV_CAP / GIB:g} GiB", f"batch of {BATCH_CONTEXT} @ {KV_CAP / GIB:g} GiB",
               "decode speed-up: bytes allow", "measured", *(["questions to repay prefill"] if reuse else [])]
    table = []
    for r in records:
        m = r["metrics"]
        peak = m["peak_kv_bytes"] / f["peak_kv_bytes"]
        context, batch = deployment.longest_context(shape, peak), deployment.largest_batch(shape, peak)
        same_host = r.get("hosts") == full.get("hosts") and len(r.get("hosts") or [""]) == 1
        measured = f["decode_ms_p50"] / m["decode_ms_p50"] if same_host and m["decode_ms_p50"] else None
        row = [*(value(r) for _, value in head), _fmt(1 - m["kv_compression"], 3), _fmt(peak, 3),
               "any" if context is None else f"{context:,}", "–" if batch is None else f"{batch:,}",
               _fmt(deployment.bytes_speedup(shape.weight_bytes, m["full_kv_bytes"], m["kv_compression"]), 2),
               _fmt(measured, 2)]
        if reuse:
            row.append(_repaid(r, full) if r.get("query") == "reuse" else "–")
        table.append(row)
    line = (f"KV bytes per token from the model's shape (2 · KV heads {shape.kv_heads} · head dim {shape.head_dim} · "
            f"{shape.dtype_bytes} bytes per layer): {shape.per_layer_type()}; weights {shape.weight_bytes / GIB:.3f} "
            "GiB as loaded.")
    return line, *_ranked(headers, table, records, split)


def _repaid(r: dict[str, Any], full: dict[str, Any]) -> str:
    def times(record: dict[str, Any]) -> tuple[float, float]:
        samples = record["samples"]
        return (sum(s["context_prefill_ms"] for s in samples) / len(samples),
                sum(s["prefill_ms"] + sum(s["decode_ms"]) for s in samples) / len(samples))

    after = deployment.break_even(*times(r), *times(full))
    return "never" if after is None else _fmt(after, 1)


def _paired_header(task: str, n: int) -> str:
    """`TASK vs full (n=12, separable: 34 pts)`: the smallest difference its n paired samples can show (`separable`)."""
    least = separable(n)
    return f"{task_name(task)} vs full (n={n}" + ("" if least is None else f", separable: {100 * least:.0f} pts") + ")"


def _paired_cell(x: Paired | None) -> str:
    return "–" if x is None else x.label()


def rows(records: list[dict[str, Any]],
         split: tuple[dict[Cell, float], dict[Cell, float]] | None = None) -> tuple[list[str], list[list[str]]]:
    """The table's headers and cells, best first where the paired evidence ranks the rows (`ranking`); `split`
    (counted and left-out cells) defaults to the one these rows give."""
    tasks = shown_tasks(records)
    full = _reference(records)
    base = full["metrics"]["decode_ms_p50"] if full else None
    per_sample = [task_samples(r) for r in records]
    task_cols = [_task_header(t, records, per_sample) for t in tasks]
    head = _head(records)
    split = split or counted_cells(records)
    shown = {task for samples in per_sample for task in samples}
    average = split is not None and len({task for task, _ in split[0]} & shown) > 1  # a suite: several that count
    headers = [*(h for h, _ in head), *task_cols,
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
            *(value(r) for _, value in head),
            *(_task_cell(m, t, samples.get(t)) for t in tasks),
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
    return _ranked(headers, table, records, split)


def _task_header(task: str, records: list[dict[str, Any]], per_sample: list[dict[str, list[float]]]) -> str:
    """`needle acc (n=21, ±95%)`, `ppl`: the task, its metric and the first row's sample count."""
    metric = next((r["metrics"].get("metric", {})[task] for r in records if task in r["metrics"].get("metric", {})), "")
    label = "ppl" if _is_perplexity(metric) else "acc"
    n = next((len(samples[task]) for samples in per_sample if task in samples), None)
    label += "" if n is None else f" (n={n}, ±95%)"
    return label if task_name(task) == label else f"{task_name(task)} {label}"


def compression_rows(records: list[dict[str, Any]],
                     split: tuple[dict[Cell, float], dict[Cell, float]] | None = None
                     ) -> tuple[list[str], list[list[str]]] | None:
    """Each row's KV compression on each task shown, ranked as the main table: a method that adapts its cache to
    the input (thresholds, freezing) compresses each task differently, so its accuracy on a task reads with what
    it kept there. None with a single task (the main table's KV compression is that one)."""
    tasks = shown_tasks(records)
    if len(tasks) < 2:
        return None
    head = _head(records)
    table = [[*(value(r) for _, value in head),
              *(_fmt(r["metrics"]["kv_compression_by_task"].get(t), 3) for t in tasks)] for r in records]
    return _ranked([*(h for h, _ in head), *map(task_name, tasks)], table, records, split)


def _ranked(headers: list[str], table: list[list[str]], records: list[dict[str, Any]],
            split: tuple[dict[Cell, float], dict[Cell, float]] | None) -> tuple[list[str], list[list[str]]]:
    """The table best first with a rank column where the paired evidence ranks its rows (`ranking`), else as given."""
    ranked = ranking(records, split)
    if ranked is None:
        return headers, table
    order, ranks = ranked
    return ["rank", *headers], [[rank, *table[i]] for i, rank in zip(order, ranks, strict=True)]


QUERY_TITLES = {"in-prompt": "Question inside the compressed prompt (in-prompt)",
                "after": "Question after its context was compressed (after)",
                "reuse": "Several questions on one compressed context (reuse)"}


def tables(records: list[dict[str, Any]]) -> str:
    """What the evidence supports, per query mode, first (`reading`); then one table per query mode (rows of one mode
    run the same tasks, so their suite averages compare), each under its heading when there are several, followed
    by the same rows' KV compression per task, their pairing with that mode's full cache and what their bytes buy.
    The cells that count come from the full cache's in-prompt row."""
    modes = list(dict.fromkeys(r.get("query", "in-prompt") for r in records))
    split = counted_cells(records)
    by_mode = {mode: [r for r in records if r.get("query", "in-prompt") == mode] for mode in modes}
    parts = []
    for mode, own in by_mode.items():
        said = reading(own, split, QUERY_TITLES.get(mode, mode) if len(modes) > 1 else None)
        parts += [said, ""] if said else []
    for mode, own in by_mode.items():
        if len(modes) > 1:
            parts += [f"### {QUERY_TITLES.get(mode, mode)}", ""]
        parts += [_github(*rows(own, split)), ""]
        sub = "####" if len(modes) > 1 else "###"
        kept = compression_rows(own, split)
        if kept is not None:
            parts += [f"{sub} KV compression per task", "", _github(*kept), ""]
        pairs = paired_rows(own, split)
        if pairs is not None:
            parts += [f"{sub} Paired with the full cache", "", _github(*pairs), ""]
        deployed = deployment_rows(own, split)
        if deployed is not None:
            parts += [f"{sub} What the bytes buy", "", deployed[0], "", _github(*deployed[1:]), ""]
    return "\n".join(parts).rstrip()


@dataclass
class Verdict:
    """One table's rows against its full cache on the counted cells (`reading`, `overview`): those the paired
    evidence does not separate from it, most compressed first; those above it and below it, closest first."""

    full: dict[str, Any]
    n: int  # paired samples
    cells: int  # counted cells
    level: list[dict[str, Any]]
    above: list[tuple[dict[str, Any], Paired]]
    below: list[tuple[dict[str, Any], Paired]]

    @property
    def rows(self) -> int:
        return len(self.level) + len(self.above) + len(self.below)

    def peak(self, r: dict[str, Any]) -> str:
        """A row's peak KV against the full cache's, as a percentage."""
        full = self.full["metrics"]["peak_kv_bytes"]
        return _pct(r["metrics"]["peak_kv_bytes"] / full) if full else "–"


def verdict(records: list[dict[str, Any]],
            split: tuple[dict[Cell, float], dict[Cell, float]] | None = None) -> Verdict | None:
    """None without a full row, a counted cell or a row paired with the full cache on them."""
    full = _reference(records)
    split = split or counted_cells(records)
    if full is None or split is None:
        return None
    cells = set(split[0]) & set(sample_scores(full))
    reference = _flat(sample_scores(full), cells)
    against = [(r, paired(reference, _flat(sample_scores(r), cells))) for r in records if r is not full]
    against = [(r, p) for r, p in against if p is not None]
    if not against:
        return None
    return Verdict(
        full, max(p.n for _, p in against), len(cells),
        sorted((r for r, p in against if not p.separated), key=lambda r: -r["metrics"]["kv_compression"]),
        sorted(((r, p) for r, p in against if p.separated and p.delta > 0), key=lambda rp: -rp[1].delta),
        sorted(((r, p) for r, p in against if p.separated and p.delta < 0), key=lambda rp: -rp[1].delta))


def reading(records: list[dict[str, Any]], split: tuple[dict[Cell, float], dict[Cell, float]] | None = None,
            title: str | None = None) -> str | None:
    """What the samples support in one table (of query mode `title`), in words: the rows the paired evidence does not
    separate from the full cache on the counted cells, most compressed first (what they free is what they buy);
    those it puts above it; those it puts below it, closest first. None without a full row or a counted cell."""
    v = verdict(records, split)
    if v is None:
        return None
    least = separable(v.n)
    lines = [f"**{title + ': w' if title else 'W'}hat the evidence supports** (each row paired with `full` on the same "
             f"{v.n} samples of the {v.cells} counted cells, 95% intervals"
             + (f"; {v.n} samples cannot separate a difference below about {100 * least:.0f} points" if least else "")
             + "):", ""]
    if v.level:
        lines.append(f"- level with the full cache, {len(v.level)} of {v.rows} rows, most compressed first (KV "
                     "freed at the end; peak KV against full's): "
                     + ", ".join(f"{_name(r)} ({_pct(r['metrics']['kv_compression'])}; {v.peak(r)})"
                                 for r in v.level))
    if v.above:
        lines.append(f"- above it, {len(v.above)}: " + ", ".join(f"{_name(r)} ({points(p.delta)})" for r, p in v.above))
    if v.below:
        lines.append(f"- below it, {len(v.below)} of {v.rows}, closest first (points lost): "
                     + ", ".join(f"{_name(r)} ({points(p.delta)})" for r, p in v.below))
    return "\n".join(lines)


def overview(records: list[dict[str, Any]]) -> str | None:
    """The leaderboard's opening reading, a line per model and query mode: how many rows the paired evidence leaves
    level with that model's full cache and the most compressed of them, how many it puts below (each model's section
    names them all). None with a single model (its section opens with its readings)."""
    tables_ = {}
    for r in records:
        tables_.setdefault((r["config"]["model"], r.get("query", "in-prompt")), []).append(r)
    if len({model for model, _ in tables_}) < 2:
        return None
    lines = []
    for model in dict.fromkeys(m for m, _ in tables_):
        split = counted_cells([r for (m, _), own in tables_.items() if m == model for r in own])
        for (m, mode), own in tables_.items():
            v = verdict(own, split) if m == model else None
            if v is None:
                continue
            top = v.level[0] if v.level else None
            best = (f"; the most compressed of them {_name(top)} frees {_pct(top['metrics']['kv_compression'])} of "
                    f"the KV, its peak {v.peak(top)} of full's" if top else "")
            lines.append(f"- **{model}**, {QUERY_TITLES.get(mode, mode).split(' (')[0].lower()}: {len(v.level)} of "
                         f"{v.rows} rows level with its full cache{best}; {len(v.above)} above, {len(v.below)} below "
                         f"({v.n} paired samples)")
    return "\n".join(lines) or None


def _name(r: dict[str, Any]) -> str:
    """A row in a sentence: method and variant, budget, and the position mode or storage when not the default."""
    extra = [r["positions"]] if r.get("positions", "original") != "original" else []
    extra += [r["kv_quant"]] if r.get("kv_quant") else []
    return " ".join([f"{r['method']} {r['variant']}".strip(), Budget.label(r["budget"]), *extra]).replace(" all", "")


def _github(headers: list[str], table: list[list[str]]) -> str:
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


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
        "Tasks are lm-eval's `kvbench_<name>`; acc = the share of samples right, with its 95% bootstrap interval. "
        "Schedule = when the method's decisions apply: once after the prompt (prompt), after every prefill chunk "
        "(chunk), or also at every decode step (decode). Positions (a column where some row leaves them): true "
        "positions (original), re-rotated keys (rerotate) or positions in the cache (naive). "
        "KV compression = 1 − active/full KV bytes at the end of each sample (mean; per task in its own table); "
        "peak KV = high-water "
        "mark of active KV over the run (max); decode × full = decode ms p50 over the `full` row's, same run and "
        "machine (– where a row's timings come from another machine than the `full` row's); "
        "policy ms/step = mean host time per decode step the method spends deciding and moving rows after attention "
        "(part of decode ms: what its smaller attention has to pay for).",
        "",
        "Paired with the full cache: each row against the `full` row of its table on the same samples, per task "
        "scored per sample and over the suite's counted cells: −samples lost (full scored higher) +samples gained, "
        "Δ = the mean per-sample difference in points (over the suite: over the counted cells' samples) and its 95% "
        "paired bootstrap interval (seeded; the samples resampled together); * where the interval excludes "
        "zero, i.e. the samples separate the row from the full cache. A task's header gives its paired samples n "
        "and the smallest difference they can separate (the fewest losses, all one way, whose interval excludes "
        "zero). Rank: rows best first by that Δ on the counted cells; a row shares the rank of the first row of its "
        "tier (marked =) unless the paired interval between the two excludes zero. `kvbench diff RESULTS A B` "
        "pairs any two rows.",
    ]
    if any("model_shape" in r for r in records):
        notes += ["", f"What the bytes buy: KV kept = active (end of each sample, mean) or peak KV over the `full` "
                  f"row's; the longest context and the largest batch of {BATCH_CONTEXT}-token sequences whose full "
                  f"cache times the peak fraction fits {KV_CAP / GIB:g} GiB of KV (the fraction measured here held "
                  "at other lengths: for a method whose cache stops growing at its budget a lower bound); the "
                  "decode speed-up the bytes allow at batch 1, (W + KV) / (W + (1 − r) · KV) with W the weights' "
                  "bytes, KV the full cache's bytes and r the row's KV compression, next to the measured one "
                  "(full's decode ms p50 over the row's, same machine); in reuse mode, the questions on one context "
                  "after which the method's context prefill and questions cost no more time than full's."]
    split = counted_cells(records)
    if split is not None and split[1]:
        left = ", ".join(task_name(t) + (f" @ {n}" if n else "") + f" (full {100 * m:.0f}%)" for (t, n), m in sorted(
            split[1].items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))
        notes.append(f"\nCells the full cache itself fails (below {100 * COUNT_THRESHOLD:.0f}%), left out of the "
                     f"suite average (a task failed at every length is run by the full cache alone and has no "
                     f"column): {left}.")
    return "\n".join([*head, "", body, *notes]) + "\n"


def _selection_key(record: dict[str, Any]) -> str:
    """`check.row_key`, naming the query mode also when it is in-prompt (so a part can pick it)."""
    key = row_key(record)
    return key if "query=" in key else f"{key} | query=in-prompt"


def select(records: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """The one row `text` names: its whole key (`model | method variant | budget | positions [| kv_quant=…] [|
    query=…]`), or some of its `|`-separated parts (e.g. `snapkv | 256 | query=after`)."""
    keys = [_selection_key(r) for r in records]
    exact = [r for r, k in zip(records, keys, strict=True) if text in (k, row_key(r))]
    parts = {p.strip() for p in text.split("|") if p.strip()}
    hits = exact or [r for r, k in zip(records, keys, strict=True) if parts <= {p.strip() for p in k.split("|")}]
    if len(hits) != 1:
        raise ValueError(f"{text!r} names {len(hits)} rows of the results file, not one; give the parts that pick one "
                         "row (`|`-separated) or its whole key. Rows:\n  " + "\n  ".join(keys))
    return hits[0]


def diff(records: list[dict[str, Any]], a: str, b: str) -> str:
    """Row B against row A on the samples both answered: per task, per (task, context length) where a task has
    lengths, and over the suite's counted cells (those the file's full cache passes): n, losses, gains, Δ and its
    paired interval."""
    first, second = select(records, a), select(records, b)
    x, y = sample_scores(first), sample_scores(second)
    lines: list[tuple[str, Paired | None]] = []
    for task in sorted({t for t, _ in x}):
        lengths = sorted(n for t, n in x if t == task and n is not None)
        lines.append((task, paired(_flat(x, task=task), _flat(y, task=task))))
        lines += [(f"{task} @ {n}", paired(_flat(x, {(task, n)}), _flat(y, {(task, n)}))) for n in lengths
                  if len(lengths) > 1]
    split = counted_cells(records)
    if split is not None and len({t for t, _ in split[0]}) > 1:
        lines.append(("suite (counted cells)", paired(_flat(x, set(split[0])), _flat(y, set(split[0])))))
    if all(p is None for _, p in lines):
        raise ValueError(f"{_selection_key(first)} and {_selection_key(second)} share no sample scored per sample "
                         "(pass/fail in [0, 1]): nothing to pair")
    table = [[name, p.n, p.lost, p.gained, f"{100 * p.delta:+.1f}",
              "–" if p.interval is None else f"[{100 * p.interval[0]:+.1f}, {100 * p.interval[1]:+.1f}]",
              "yes" if p.separated else "no"] for name, p in lines if p is not None]
    head = [f"A: {_selection_key(first)}", f"B: {_selection_key(second)}", ""]
    return "\n".join(head) + tabulate(table, headers=["cells", "paired samples", "lost (A > B)", "gained (B > A)",
                                                      "Δ B − A (points)", "95% paired interval", "separated"],
                                      tablefmt="github", disable_numparse=True) + "\n"
