"""`kvbench leaderboard --check FILE`: the deterministic columns of a sweep's cells against a committed results file.

Task scores, KV compression and KV bytes are the same on every run of the same code, up to cross-CPU rounding
(`CHECK_TOLERANCE`); timings are shown, never compared. A row is its model, method, variant, budget, position and
query mode; a cell is a row on one task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvbench.evaluation import results
from kvbench.policy import Budget


def committed(path: Path) -> list[dict[str, Any]]:
    """The committed records, refused before any work when their deterministic columns cannot be read."""
    records = results.load(path, "--check")["records"]
    try:
        deterministic(records)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"--check {path}: its records do not hold what the check compares (every record's samples "
                         f"with their scores, KV compression and bytes): {type(err).__name__}: {err}") from None
    return records


def row_key(record: dict[str, Any]) -> str:
    key = f"{record['config']['model']} | {record['method']} {record['variant']}".strip()
    key += f" | {Budget.label(record['budget'])} | {record['positions']}"
    key += f" | kv_quant={record['kv_quant']}" if record.get("kv_quant") else ""
    return key if record["query"] == "in-prompt" else f"{key} | query={record['query']}"


# Relative tolerances of `--check`. The same code on another CPU (other MKL kernels, other rounding) can flip
# a knife-edge decision: on one CI host ASR-KF-EGR froze one token-layer more in one needle sample (active KV
# 31645696 -> 31645440 bytes, 8e-6 relative). A change to a method's rule moves far more than 1e-4.
CHECK_TOLERANCE = {"score": 1e-3, "kv_compression": 1e-4, "active_kv_bytes": 1e-4, "peak_kv_bytes": 1e-4,
                   "frozen_kv_bytes": 1e-4}


def deterministic(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (row, task): the columns that do not depend on timing — the same on every run of the same code, up to
    cross-CPU rounding (`CHECK_TOLERANCE`)."""
    out = {}
    for r in records:
        by_task: dict[str, list[dict[str, Any]]] = {}
        for s in r["samples"]:
            by_task.setdefault(s["task"], []).append(s)
        for task, samples in by_task.items():
            out[(row_key(r), task)] = {
                "score": r["metrics"]["accuracy"].get(task, math.nan),
                "kv_compression": sum(s["kv_compression"] for s in samples) / len(samples),
                "active_kv_bytes": sum(s["active_kv_bytes"] for s in samples) / len(samples),
                "peak_kv_bytes": max(s["peak_kv_bytes"] for s in samples),
                "frozen_kv_bytes": sum(s["frozen_kv_bytes"] for s in samples) / len(samples),
            }
    return out


def compare_deterministic(records: list[dict[str, Any]], committed: list[dict[str, Any]]) -> list[str]:
    """Every cell run now must be in the committed leaderboard with the same deterministic values."""
    now, then = deterministic(records), deterministic(committed)
    problems = []
    for key, values in now.items():
        if key not in then:
            problems.append(f"{key[0]} / {key[1]}: not in the committed leaderboard")
            continue
        for column, value in values.items():
            old = then[key][column]
            close = math.isclose(value, old, rel_tol=CHECK_TOLERANCE[column], abs_tol=1e-12) or (
                math.isnan(value) and math.isnan(old))
            if not close:
                problems.append(f"{key[0]} / {key[1]} / {column}: committed {old!r}, now {value!r}")
    return problems
