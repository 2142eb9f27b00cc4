"""Leaderboard plots (matplotlib, PNG): needle heatmaps, accuracy versus KV memory and versus compression per query
mode, decode time versus context."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from kvbench.evaluation.leaderboard import counted_cells, suite_average  # noqa: E402
from kvbench.evaluation.records import MIB  # noqa: E402
from kvbench.files import atomic  # noqa: E402
from kvbench.policy import Budget  # noqa: E402

CONTEXT_BINS = (1024, 2048, 4096, 6144, 8192)


def label(record: dict[str, Any]) -> str:
    query = record.get("query", "in-prompt")
    budget = Budget.label(record["budget"]) if record["budget"] else ""
    parts = [record["method"], record["variant"], budget, record["positions"], record.get("kv_quant") or "",
             "" if query == "in-prompt" else f"query={query}"]
    return " ".join(p for p in parts if p and p != "original")


def _save(fig, path: Path) -> Path:
    """Write the PNG whole or not at all."""
    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _in_prompt(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the question in the prompt, where there are any (else all): a figure of one panel or line per
    row stays readable with one query mode; the tables hold the others."""
    own = [r for r in records if r.get("query", "in-prompt") == "in-prompt"]
    return own or records


def needle_heatmap(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Exact match by context length (rows) and needle depth (columns), one panel per row of the leaderboard with
    the question in the prompt, on the simple-filler needle samples."""
    grids = []
    for r in _in_prompt(records):
        cells: dict[tuple[int, float], list[float]] = defaultdict(list)
        for s in r["samples"]:
            meta = s["meta"]
            if "depth" in meta and "context_length" in meta and meta.get("filler", "simple") == "simple":
                cells[(int(meta["context_length"]), float(meta["depth"]))].append(s["score"])
        if cells:
            grids.append((label(r), cells))
    if not grids:
        return None
    lengths = sorted({k[0] for _, c in grids for k in c})
    depths = sorted({k[1] for _, c in grids for k in c})
    cols = min(4, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.6 * len(lengths) * rows + 1.2 * rows), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for ax, (name, cells) in zip(axes.flat, grids, strict=False):
        grid = [[statistics.fmean(cells[(n, d)]) if (n, d) in cells else math.nan for d in depths] for n in lengths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0%}" if v not in (0, 1) else ("✓" if v else "✗"), ha="center", va="center")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_yticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths],
                      fontsize=8)
    fig.supxlabel("needle depth (share of the context before it)")
    fig.supylabel("context length (tokens)")
    fig.suptitle("Needle retrieval (exact match) by context length and depth")
    return _save(fig, path)


def mean_accuracy(record: dict[str, Any]) -> float | None:
    """The row's mean score over its accuracy-type tasks (perplexities left out), None without any."""
    m = record["metrics"]
    accs = [v for t, v in m["accuracy"].items() if "perplexity" not in m.get("metric", {}).get(t, "")]
    return statistics.fmean(accs) if accs else None


MARKERS = {None: "o", "int8": "s", "int4": "^", "int2": "v"}
"""A point's marker: the KV storage (other schemes: a diamond)."""


def _colors(names: list[str]) -> dict[str, Any]:
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])  # distinct first
    return {n: palette[i % len(palette)] for i, n in enumerate(sorted(names))}


def _method(record: dict[str, Any]) -> str:
    """A row's method and variant: one colour in the plots, whatever its budget or storage."""
    return f"{record['method']} {record['variant']}".strip()


Point = tuple[float, float, dict[str, Any]]  # active KV MiB, accuracy, the row


def pareto_points(records: list[dict[str, Any]]) -> tuple[dict | None, dict[str, list[Point]]]:
    """The counted cells (None without a full row) and, per query mode with any, each row's point: its mean active
    KV MiB and its suite average over the counted cells, as the tables rank it (a mean over all its tasks would put
    the full cache below the methods: it alone runs the tasks it fails)."""
    split = counted_cells(records)
    counted = split[0] if split else None
    points: dict[str, list[Point]] = {}
    for r in records:
        y = _accuracy(r, counted)
        if y is not None:
            points.setdefault(r.get("query", "in-prompt"), []).append((r["metrics"]["active_kv_bytes"] / MIB, y, r))
    return counted, points


def pareto(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per query mode: each row's accuracy (the suite average over the cells the full cache passes, as in
    the tables; else its mean over accuracy-type tasks) against its mean active KV bytes, a colour per method, a
    marker per KV storage, the budget (and a position mode or storage other than the default) beside each point and
    the frontier drawn: eviction and quantization on one
    scale of bytes."""
    counted, points = pareto_points(records)
    modes = list(points)
    if not modes:
        return None
    colors = _colors(list({_method(r) for pts in points.values() for _, _, r in pts}))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5.5), squeeze=False, sharey=True)
    for ax, mode in zip(axes.flat, modes, strict=True):
        for x, y, r in points[mode]:
            ax.scatter([x], [y], color=colors[_method(r)], marker=MARKERS.get(r.get("kv_quant"), "D"), zorder=3,
                       edgecolors="black" if r["method"] == "full" else "none", s=40)
            budget = Budget.label(r["budget"]) if r["budget"] else ""
            positions = r.get("positions", "original")
            ax.annotate(" ".join(p for p in (budget, "" if positions == "original" else positions,
                                             r.get("kv_quant") or "") if p), (x, y),
                        textcoords="offset points", xytext=(4, 3), fontsize=6)
        frontier, best = [], -1.0
        for x, y, r in sorted(points[mode], key=lambda p: (p[0], -p[1])):
            if y > best:
                frontier.append((x, y, r))
                best = y
        ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:orange", alpha=0.5,
                zorder=2, label="frontier")
        # frontier rows numbered at their points and named in a key under the panel: their full labels (a variant's
        # parameters) are too long to sit beside points that lie close together
        for i, (x, y, _) in enumerate(frontier, 1):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(-6 if i % 2 else 3, -11), fontsize=8,
                        color="tab:orange", fontweight="bold")  # neighbours' numbers side by side, not stacked
        ax.text(0, -0.14, "frontier: " + "\n".join(f"{i} {label(r)}" for i, (*_, r) in enumerate(frontier, 1)),
                transform=ax.transAxes, va="top", fontsize=7, color="tab:orange")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))  # labels inside a single decade too
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("active KV MiB at the end of a sample (mean, log scale)")
        ax.set_title(f"question {mode}" if mode != "in-prompt" else "question in the prompt", fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("suite average (cells the full cache passes)" if counted else "mean accuracy")
    axes.flat[0].set_ylim(-0.05, 1.05)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=n) for n, c in colors.items()]
    stored = {r.get("kv_quant") for pts in points.values() for *_, r in pts}
    handles += [plt.Line2D([], [], color="black", marker=m, linestyle="", label=q or "model dtype")
                for q, m in MARKERS.items() if q in stored]
    others = sorted(q for q in stored if q not in MARKERS)
    if others:
        handles.append(plt.Line2D([], [], color="black", marker="D", linestyle="", label=", ".join(others)))
    handles.append(plt.Line2D([], [], color="tab:orange", alpha=0.5, label="frontier"))
    axes.flat[-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Accuracy versus KV memory (budget and storage beside each point)")
    return _save(fig, path)


def _accuracy(record: dict[str, Any], counted: dict | None) -> float | None:
    """The row's suite average over the cells the full cache passes, else its mean over accuracy-type tasks."""
    return suite_average(record, counted) if counted else mean_accuracy(record)


def accuracy_vs_compression(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per query mode: accuracy against KV compression, one colour per method (a line through its
    budgets), the full cache as a dashed line."""
    split = counted_cells(records)
    counted = split[0] if split else None
    modes = list(dict.fromkeys(r.get("query", "in-prompt") for r in records))
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {mode: defaultdict(list) for mode in modes}
    fulls: dict[str, float] = {}
    for r in records:
        y = _accuracy(r, counted)
        if y is None:
            continue
        mode = r.get("query", "in-prompt")
        if r["method"] == "full" and not r.get("kv_quant"):  # a quantized full cache is a point like any other
            fulls[mode] = y
            continue
        name = " ".join(p for p in (r["method"], r["variant"], r["positions"], r.get("schedule") or "",
                                    r.get("kv_quant") or "") if p and p != "original")
        curves[mode][name].append((r["metrics"]["kv_compression"], y))
    if not any(curves.values()):
        return None
    colors = _colors(list({n for c in curves.values() for n in c}))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.8), squeeze=False, sharey=True)
    for ax, mode in zip(axes.flat, modes, strict=True):
        for name, pts in sorted(curves[mode].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[name], label=name)
        if mode in fulls:
            ax.axhline(fulls[mode], color="black", linestyle="--", linewidth=1, label="full cache")
        ax.set_title(f"question {mode}" if mode != "in-prompt" else "question in the prompt", fontsize=10)
        ax.set_xlabel("KV compression (1 − active / full KV bytes)")
        ax.set_xlim(-0.02, 1.0)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("suite average (cells the full cache passes)" if counted else "mean accuracy")
    axes.flat[0].set_ylim(-0.05, 1.05)
    axes.flat[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Accuracy versus KV compression")
    return _save(fig, path)


def decode_vs_context(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Median decode ms/token of single-prompt samples, by prompt length (binned), one line per row with the
    question in the prompt; only the rows timed on one machine (the one most rows were), as timings of two do not
    compare."""
    records = _in_prompt(records)
    machines = Counter(tuple(r.get("hosts") or ()) for r in records if len(r.get("hosts") or ()) <= 1)
    machine = machines.most_common(1)[0][0] if machines else ()
    left_out = sum(tuple(r.get("hosts") or ()) != machine for r in records)
    records = [r for r in records if tuple(r.get("hosts") or ()) == machine]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = [(c, m) for m in ("o", "s", "^", "D") for c in plt.get_cmap("tab10").colors]
    drawn, skipped = 0, []
    for r in records:
        by_bin: dict[int, list[float]] = defaultdict(list)
        for s in r["samples"]:
            if s["decode_ms"] and "codes" not in s["meta"] and "turns" not in s["meta"]:  # one prompt, one reply
                nearest = min(CONTEXT_BINS, key=lambda b, n=s["prompt_tokens"]: abs(math.log(b / n)))
                by_bin[nearest] += s["decode_ms"]
        if len(by_bin) >= 2:
            xs = sorted(by_bin)
            color, marker = styles[drawn % len(styles)]
            ax.plot(xs, [statistics.median(by_bin[x]) for x in xs], marker=marker, color=color, label=label(r))
            drawn += 1
        else:
            skipped.append(label(r))
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONTEXT_BINS, [f"{b // 1024}k" for b in CONTEXT_BINS])
    ax.set_xlabel("prompt length (tokens, binned)")
    ax.set_ylabel("decode ms / token (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    title = "Decode time per token versus context length"
    if machine and left_out:
        title += f"\n(rows timed on {machine[0]}; {left_out} rows timed on other machines left out)"
    if skipped:  # e.g. a row whose answers all end at once: no decode steps to time
        title += f"\n(no decode steps at two or more lengths: {', '.join(skipped)})"
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def draw_all(records: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Every plot that the records have data for, by title."""
    made = {
        "needle heatmap (depth × context length) per method": needle_heatmap(records, out_dir / "needle_heatmap.png"),
        "accuracy versus active KV memory (Pareto)": pareto(records, out_dir / "pareto.png"),
        "accuracy versus KV compression, per query mode": accuracy_vs_compression(
            records, out_dir / "accuracy_vs_compression.png"),
        "decode ms/token versus context length": decode_vs_context(records, out_dir / "decode_vs_context.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
