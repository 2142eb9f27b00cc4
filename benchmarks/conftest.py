"""`make bench`: pytest-benchmark over the decode step. Every figure that matters is a ratio within one run: each
round of a row over transformers' own decode timed just before it on the same weights (so a machine drifting during
the run moves both sides alike), the median over the rounds, printed at the end and saved with the run. Absolute
times move with the machine and are not compared."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

REFERENCE = "transformers"  # the row of a group every other row of it is divided by


def pytest_configure(config: pytest.Config) -> None:
    """One thread: the host-bound regime (a big model on a GPU, Python launching each layer's work), and figures
    that do not depend on how many cores the machine lends."""
    torch.set_num_threads(int(os.environ.get("KVBENCH_BENCH_THREADS", "1")))


def ratios(benchmarks: list) -> dict[str, dict[str, float]]:
    """{group: {row: the median over its rounds of round / the reference run just before it}} for the rows timed so
    (`paired_ratios`), with the reference's own row at 1."""
    found: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        paired = bench.extra_info.get("paired_ratios")
        if paired:
            rows = found.setdefault(bench.group or "", {REFERENCE: 1.0})
            rows[bench.extra_info.get("row", bench.name)] = statistics.median(paired)
    return found


BASELINE = Path(__file__).with_name("baseline.json")  # the committed ratios (`KVBENCH_BENCH_SAVE=1 make bench`)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Each row's ratio now, beside the committed baseline's (ratios of one machine; compare them on the same one)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    found = ratios(session.benchmarks)
    syncs, ops = ({b.extra_info.get("row", b.name): b.extra_info[key] for b in session.benchmarks
                   if key in b.extra_info} for key in ("host_syncs_per_step", "ops_per_step"))
    saved = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    here = machine()
    if saved and not saved.get("machine", "").startswith(here):
        terminalreporter.write_line(f"the baseline's ratios come from another machine ({saved.get('machine')}); this "
                                    f"is {here}: ratios move between hosts, so set them side by side only on one")
    for group, rows in found.items():
        base = saved.get("ratios", {}).get(group, {})
        terminalreporter.write_sep("-", f"{group}: × {REFERENCE}'s, round by round (median; same run, same weights)")
        terminalreporter.write_line(f"  {'row':28s} {'now':>6s} {'baseline':>9s} {'host syncs/step':>16s} "
                                    f"{'ops/step':>9s}   (baseline: {saved.get('machine', 'none')})")
        for row, ratio in sorted(rows.items(), key=lambda kv: kv[1]):
            was = f"{base[row]:9.2f}" if row in base else f"{'-':>9s}"
            count = f"{syncs[row]:16.1f}" if row in syncs else f"{'-':>16s}"
            launched = f"{ops[row]:9.0f}" if row in ops else f"{'-':>9s}"
            terminalreporter.write_line(f"  {row:28s} {ratio:6.2f} {was} {count} {launched}")
    if os.environ.get("KVBENCH_BENCH_SAVE"):
        BASELINE.write_text(json.dumps({"machine": here, "ratios": found}, indent=1, sort_keys=True) + "\n")
        terminalreporter.write_line(f"wrote {BASELINE}")


def machine() -> str:
    """The host a run's ratios belong to: CPU model and vector unit, threads, torch."""
    from kvbench.evaluation.records import cpu_model

    return f"{cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
