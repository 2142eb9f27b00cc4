"""Run records: per-sample outcomes folded into one record per (method, budget), and atomic writes."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import statistics
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from kvbench.runtime.session import RunResult

MIB = 1024 * 1024


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("kvbench", "torch", "transformers", "lm_eval", "flash_attn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    out["cpu"] = cpu_model()
    out["torch_threads"] = str(torch.get_num_threads())
    return out


NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "lm_eval", "datasets", "gguf")
"""The libraries whose release can change a cell's numbers (kernels, model code, tokenization, task building,
dequantization): a cell computed under other releases of them is another cell."""


def numeric_versions() -> dict[str, str]:
    out = {}
    for pkg in NUMERIC_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


RENDERING = ("evaluation/leaderboard.py", "evaluation/plots.py", "evaluation/evidence.py", "evaluation/deployment.py",
             "evaluation/check.py")
"""kvbench's files that only read finished records (tables, plots, paired evidence, deployment columns, `--check`):
left out of the source hash, so a new column keeps every stored cell (a leaderboard regenerated in parts resumes
across such changes). tests/test_layout.py holds that the code computing a cell never imports them."""


@functools.cache
def source_hash() -> str:
    """Hash of kvbench's own files (core, methods, tasks: code, YAMLs, templates; bytecode left out), except
    `RENDERING`: a change to any of them is another cell."""
    import kvbench
    import kvbench.methods
    import kvbench.tasks

    digest = hashlib.sha256()
    for pkg in (kvbench, kvbench.methods, kvbench.tasks):
        root = Path(pkg.__file__).parent
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                        and p.suffix != ".pyc"):
            if pkg is kvbench and f.relative_to(root).as_posix() in RENDERING:
                continue
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def host(v: dict[str, str]) -> str:
    """The machine a timing was measured on, from `versions()`: timings of two hosts do not compare."""
    return f"{v['device']}, {v['cpu']}, {v['torch_threads']} threads"


def cpu_model() -> str:
    """The CPU's model name and widest vector unit: CPU timings and batch scaling differ by far between hosts of
    the same core count (seen here: `full` batch 4 at 3.3x batch 1 on an AVX-512 host, 1.8x on an AVX2 EPYC)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's entry
    name = fields.get("model name", platform.machine())
    flags = (fields.get("flags") or fields.get("Features", "")).split()
    vector = next((f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags), "")
    return f"{name} ({vector.removesuffix('f')})" if vector else name


def sample_record(task: str, sample_id: str, answer: str, meta: dict[str, Any], prediction: str, result: RunResult,
                  score: float | None) -> dict[str, Any]:
    """One sample as the records hold it: what was asked and answered, and what the engine measured."""
    c = result.cache
    return {
        "task": task,
        "id": sample_id,
        "answer": answer,
        "prediction": prediction,
        "score": score,
        "meta": meta,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.tokens),
        "stop_reason": result.stop_reason,
        "prefill_ms": result.prefill_s * 1e3,
        "context_prefill_ms": result.context_s * 1e3,  # question after compression: the shared context's prefill
        "context_compressions": result.context_compressions,
        "decode_ms": [round(s * 1e3, 3) for s in result.decode_s],
        "kv_compression": c.kv_compression,
        "mean_kv_compression": c.mean_kv_compression,
        "active_kv_bytes": c.active_bytes,
        "full_kv_bytes": c.full_bytes,
        "peak_kv_bytes": c.peak_active_bytes,
        "peak_reserved_kv_bytes": c.peak_reserved_bytes,
        "frozen_kv_bytes": c.frozen_bytes,
        "peak_frozen_kv_bytes": c.peak_frozen_bytes,
        "frozen_store_bytes": c.frozen_store_bytes,
        "evicted_tokens": sum(c.evicted_tokens),
        "expired_tokens": sum(c.expired_tokens),  # left a sliding layer's window (the full cache drops them too)
        "freezes": c.freezes,
        "thaws": c.thaws,
        "rollbacks": c.rollbacks,  # tokens undone and generated again (ASR-KF-EGR's level 4)
        "rolled_back_tokens": c.rolled_back_tokens,
        "frozen_scored": c.frozen_scored,  # frozen keys read to score them against new queries
        "offload": vars(c.offload),
        "restore": vars(c.restore),
        "policy_ms": {phase: seconds * 1e3 for phase, seconds in c.policy_seconds.items()},
        "memory_peak_bytes": result.memory_peak_bytes,
        "policy": result.policy_report,
    }


def summarize(samples: list[dict[str, Any]], scores: dict[str, float] | None = None,
              metric_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Aggregate metrics of one method row: a score per task, bytes, latency percentiles. `scores` are task
    scores computed elsewhere (lm-eval's aggregates), `metric_names` what they are (default: accuracy)."""
    tasks = sorted({s["task"] for s in samples})
    accuracy = {t: statistics.fmean(s["score"] for s in samples if s["task"] == t) for t in tasks
                if all(s["score"] is not None for s in samples if s["task"] == t)}
    steps = sorted(ms for s in samples for ms in s["decode_ms"])
    decode_total_s = sum(steps) / 1e3

    def pct(q: float) -> float | None:
        return steps[min(len(steps) - 1, int(q * len(steps)))] if steps else None

    def mean(key: str) -> float:
        return statistics.fmean(s[key] for s in samples)

    per_task = {t: [s["score"] for s in samples if s["task"] == t] for t in accuracy}
    return {
        "accuracy": {**accuracy, **(scores or {})},
        # per-sample tasks: how many samples, and the standard error of their mean score
        "accuracy_n": {t: len(v) for t, v in per_task.items()},
        "accuracy_stderr": {t: statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None
                            for t, v in per_task.items()},
        "metric": {t: (metric_names or {}).get(t, "accuracy") for t in tasks},
        "samples": len(samples),
        "kv_compression": mean("kv_compression"),
        "mean_kv_compression": mean("mean_kv_compression"),
        "kv_compression_by_task": {
            t: statistics.fmean(s["kv_compression"] for s in samples if s["task"] == t) for t in tasks
        },
        "active_kv_bytes": mean("active_kv_bytes"),
        "full_kv_bytes": mean("full_kv_bytes"),
        "peak_kv_bytes": max(s["peak_kv_bytes"] for s in samples),
        "peak_reserved_kv_bytes": max(s["peak_reserved_kv_bytes"] for s in samples),
        "frozen_kv_bytes": mean("frozen_kv_bytes"),
        "peak_frozen_kv_bytes": max(s["peak_frozen_kv_bytes"] for s in samples),
        "memory_peak_bytes": max(s["memory_peak_bytes"] for s in samples),
        "prefill_ms": mean("prefill_ms"),
        "decode_ms_p50": pct(0.5),
        "decode_ms_p95": pct(0.95),
        "tokens_per_s": len(steps) / decode_total_s if decode_total_s else None,
        "freezes": sum(s["freezes"] for s in samples),
        "thaws": sum(s["thaws"] for s in samples),
        "rollbacks": sum(s["rollbacks"] for s in samples),
        "rolled_back_tokens": sum(s["rolled_back_tokens"] for s in samples),
        "frozen_scored": sum(s["frozen_scored"] for s in samples),
        "policy": _sum_counters([s["policy"] for s in samples]),
        "transfer_ms": sum(s["offload"]["seconds"] + s["restore"]["seconds"] for s in samples) * 1e3,
        # the policy's bookkeeping inside each decode step (LayerView, step, freeze/thaw/evict copies)
        "policy_ms_per_decode_step": sum(s["policy_ms"]["decode"] for s in samples) / len(steps) if steps else None,
    }


def _sum_counters(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold per-sample policy reports: integer counters add up, float measurements are averaged."""
    keys = dict.fromkeys(k for rep in reports for k in rep)
    out: dict[str, Any] = {}
    for key in keys:
        values = [rep[key] for rep in reports if key in rep]
        if all(isinstance(v, dict) for v in values):
            out[key] = _sum_counters(values)
        elif all(isinstance(v, int) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, int | float) for v in values):
            out[key] = statistics.fmean(values)
    return out


def check_outputs(out_dir: Path, names: list[str], overwrite: bool = False, flag: str = "--out") -> None:
    """Fail before any work if results could not be written to `out_dir`/`names`: `out_dir` a file, a name a
    folder, the nearest existing folder not writable, or (unless `overwrite`) results already there. Creates
    nothing, so a refused run leaves no trace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{flag} {out_dir} is a file, not a folder")
    for name in names:
        path = out_dir / name
        if path.is_dir():
            raise ValueError(f"{flag} {out_dir}: {path} is a folder, so the results file cannot be written")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag} {out_dir} already holds {name}; choose another folder or pass --overwrite")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out_dir}: cannot write in {existing}")
