"""Run records -> a markdown leaderboard (tabulate), one row per (method, budget)."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from kvbench.records import MIB


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _is_perplexity(metric: str) -> bool:
    return "perplexity" in metric


def _score(value: float, metric: str) -> str:
    return _fmt(value, 2) if _is_perplexity(metric) else _fmt(100 * value, 0) + "%"


def _task_cells(m: dict[str, Any], task: str, with_compression: bool) -> list[str]:
    if task not in m["accuracy"]:
        return ["–", "–"] if with_compression else ["–"]
    cells = [_score(m["accuracy"][task], m.get("metric", {}).get(task, "accuracy"))]
    if with_compression:
        cells.append(_fmt(m["kv_compression_by_task"][task], 3))
    return cells


def rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in records for t in r["metrics"]["accuracy"]})
    metric = {t: name for r in records for t, name in r["metrics"].get("metric", {}).items()}
    full = next((r["metrics"] for r in records if r["method"] == "full"), None)
    base = full["decode_ms_p50"] if full else None
    per_task = len(tasks) > 1
    labels = {t: "ppl" if _is_perplexity(metric.get(t, "")) else "acc" for t in tasks}
    task_cols = [f"{t} {what}" for t in tasks for what in ((labels[t], "KV comp.") if per_task else (labels[t],))]
    queries = any(r.get("query", "in-prompt") != "in-prompt" for r in records)
    headers = ["method", "budget", "positions", *(["query"] if queries else []), *task_cols, "KV compression",
               "active KV MiB", "peak KV MiB", "prefill ms", "decode ms p50", "decode ms p95", "tok/s", "decode × full",
               "policy ms/step"]
    freezing = any(r["metrics"]["freezes"] for r in records)
    if freezing:
        headers += ["mean KV comp.", "frozen MiB", "thaws", "recoveries"]
    table = []
    for r in records:
        m = r["metrics"]
        ratio = m["decode_ms_p50"] / base if base and m["decode_ms_p50"] else None
        table.append([
            f"{r['method']} {r['variant']}".strip(), r["budget"] or "all", r.get("positions", "original"),
            *([r.get("query", "in-prompt")] if queries else []),
            *(cell for t in tasks for cell in _task_cells(m, t, per_task)),
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


def markdown(records: list[dict[str, Any]], title: str | None = None) -> str:
    headers, table = rows(records)
    body = tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)
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
        "KV compression = 1 − active/full KV bytes at the end of each sample (mean); peak KV = high-water "
        "mark of active KV over the run (max); decode × full = decode ms p50 over the `full` row's, same run; "
        "policy ms/step = mean host time per decode step the method spends deciding and moving rows after attention "
        "(part of decode ms: what its smaller attention has to pay for).",
    ]
    return "\n".join([*head, "", body, *notes]) + "\n"
