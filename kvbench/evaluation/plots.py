"""Leaderboard plots (matplotlib, PNG): needle heatmaps, accuracy versus KV memory and versus compression per query
mode, decode time versus context."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def needle_heatmap(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Exact match by context length (rows) and needle depth (columns), one panel per row of the leaderboard,
    on the simple-filler needle samples."""
    grids = []
    for r in records:
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


def pareto(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean accuracy over the accuracy-type tasks against mean active KV memory; the frontier is drawn."""
    points = []
    for r in records:
        accuracy = mean_accuracy(r)
        if accuracy is not None:
            points.append((r["metrics"]["active_kv_bytes"] / MIB, accuracy, label(r)))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
    clusters: dict[tuple[float, float], list[str]] = defaultdict(list)  # near-identical points share one label
    for x, y, name in points:
        key = next((k for k in clusters if abs(math.log(k[0] / x)) < 0.03 and abs(k[1] - y) < 0.015), (x, y))
        clusters[key].append(name)
    for (x, y), names in clusters.items():
        ax.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(5, 0), fontsize=7, va="center")
    frontier, best = [], -1.0
    for x, y, _ in sorted(points):
        if y > best:
            frontier.append((x, y))
            best = y
    ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:orange", alpha=0.6,
            label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("active KV MiB at the end of a sample (mean, log scale)")
    ax.set_ylabel("mean accuracy over the accuracy tasks")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Accuracy versus KV memory")
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
    names = sorted({n for c in curves.values() for n in c})
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("tab20").colors[1::2])  # distinct first
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
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
    """Median decode ms/token of single-prompt samples, by prompt length (binned), one line per row."""
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
    ax.legend(fontsize=7, ncol=2)
    title = "Decode time per token versus context length"
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
