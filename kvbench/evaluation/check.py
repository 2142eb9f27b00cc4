"""`kvbench leaderboard --check FILE`: the deterministic columns of a sweep's cells against a committed results file.

Task scores, KV compression and KV bytes are the same on every run of the same code, up to cross-CPU rounding
(`CHECK_TOLERANCE`); timings are shown, never compared. A row is its model, method, variant, budget, position and
query mode; a cell is a row on one task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbench.evaluation import results
from kvbench.policy import AcrossLayers, Budget, policy_class


@dataclass(frozen=True)
class Reference:
    """A committed results file: its records and the source hash its cells were computed with (None when its
    header names none, as `kvbench compare`'s do)."""

    records: list[dict[str, Any]]
    source: str | None = None


@dataclass
class Comparison:
    """What `--check` found: the columns that moved, and the cells it let through by a documented bound, named."""

    problems: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)


def committed(path: Path) -> Reference:
    """The committed records, refused before any work when their deterministic columns cannot be read."""
    data = results.load(path, "--check")
    records = data["records"]
    try:
        deterministic(records)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"--check {path}: its records do not hold what the check compares (every record's samples "
                         f"with their scores, KV compression and bytes): {type(err).__name__}: {err}") from None
    return Reference(records, data.get("run", {}).get("source_hash"))


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


# Source hashes of committed records whose cells were computed while every method decided layer by layer. Since
# `policy.AcrossLayers`, a method taking it holds each decode token in every layer until the last layer's attention,
# so where a run's peak falls in a decode step (the question asked after compression; a long answer under a ratio
# budget) its peak KV is up to L - 1 rows above such a record's, never below: the bound tests/test_method_contract.py
# proves. Measured on the record's CI slice: StreamingLLM and H2O 0.5, needle, query after, +29 rows of SmolLM2's
# 1,536 bytes. Against these records `--check` lets exactly that through, and names each cell it let through.
DECIDED_PER_LAYER = frozenset({"23208a9f3ecb7eca"})


def _across_layers_rows(record: dict[str, Any]) -> int:
    """How many bytes above a per-layer record's peak this record's method may now peak: (L - 1) rows of one
    layer's keys and values; 0 where the step still decides layer by layer (a method without the capability, a
    model with sliding layers, quantized rows: `PolicyCache.stacked_view`) or the record lacks its model's shape."""
    shape = record.get("model_shape")
    if (shape is None or record.get("kv_quant") or any(w is not None for w in shape["windows"])
            or not issubclass(policy_class(record["method"]), AcrossLayers)):
        return 0
    return (len(shape["windows"]) - 1) * 2 * shape["kv_heads"] * shape["head_dim"] * shape["dtype_bytes"]


def compare_deterministic(records: list[dict[str, Any]], committed: Reference) -> Comparison:
    """Every cell run now must be in the committed leaderboard with the same deterministic values (the peak of a
    method deciding across layers against a record of `DECIDED_PER_LAYER`: at most its (L - 1) rows above)."""
    now, then = deterministic(records), deterministic(committed.records)
    slack = {row_key(r): _across_layers_rows(r) for r in records} if committed.source in DECIDED_PER_LAYER else {}
    out = Comparison()
    for key, values in now.items():
        if key not in then:
            out.problems.append(f"{key[0]} / {key[1]}: not in the committed leaderboard")
            continue
        for column, value in values.items():
            old = then[key][column]
            close = math.isclose(value, old, rel_tol=CHECK_TOLERANCE[column], abs_tol=1e-12) or (
                math.isnan(value) and math.isnan(old))
            if close:
                continue
            if column == "peak_kv_bytes" and 0 < value - old <= slack.get(key[0], 0):
                out.allowed.append(f"{key[0]} / {key[1]} / {column}: committed {old!r}, now {value!r} "
                                   f"(+{value - old:g} bytes, within the (L - 1) rows of deciding across layers)")
                continue
            out.problems.append(f"{key[0]} / {key[1]} / {column}: committed {old!r}, now {value!r}")
    return out
