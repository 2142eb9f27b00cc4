"""The trade-off table of README.md from this folder's results.json: per row, accuracy per task with its sample
count, mean (over steps) and final active-KV reduction on the retrieval tasks, peak active KV, decode ms per step
and its ratio to `full` in the same run, the policy's share of a step, what recovery did, and the frozen keys
the query-driven thaw read (summed over layers and forwards, per sample).
    .venv/bin/python reports/asrkf/tradeoff/table.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tabulate import tabulate

from kvbench.policy import Budget

RETRIEVAL = ("kvbench_needle", "kvbench_rope_passkey")


def main() -> None:
    records = json.loads((Path(__file__).parent / "results.json").read_text())["records"]
    full_ms = next(r["metrics"]["decode_ms_p50"] for r in records if r["method"] == "full")
    rows = []
    for r in records:
        m, samples = r["metrics"], [s for s in r["samples"] if s["task"] in RETRIEVAL]
        label = " ".join(p for p in (r["method"], r["variant"], Budget.label(r["budget"]) if r["budget"] else "") if p)
        recoveries = m["policy"].get("recoveries", {})
        rows.append([
            label,
            *(f"{100 * m['accuracy'][t]:.0f}% (n={m['accuracy_n'][t]})" for t in RETRIEVAL),
            f"{m['accuracy']['kvbench_ppl']:.2f}",
            f"{statistics.fmean(s['mean_kv_compression'] for s in samples):.2f}",
            f"{statistics.fmean(s['kv_compression'] for s in samples):.2f}",
            f"{m['peak_kv_bytes'] / 2**20:.1f}",
            f"{m['decode_ms_p50']:.0f}", f"{m['decode_ms_p50'] / full_ms:.2f}",
            f"{m['policy_ms_per_decode_step']:.0f}" if m["policy_ms_per_decode_step"] is not None else "–",
            " ".join(f"{k}:{v}" for k, v in recoveries.items() if v) or "–",
            f"{m['rolled_back_tokens']}" if m["rollbacks"] else "–",
            f"{m['frozen_scored'] / len(r['samples']):.0f}",
        ])
    print(tabulate(rows, headers=["row", "needle", "passkey", "ppl", "mean red.", "final red.", "peak KV MiB",
                                  "decode ms", "× full", "policy ms/step", "recoveries", "regenerated",
                                  "frozen keys read per sample"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
