"""The deployment columns: a model's KV bytes from its shape, and what a row's measured bytes buy, against the
formulas on shapes written down here."""

from __future__ import annotations

import pytest

import tiny
from kvbench.evaluation.deployment import ModelShape, break_even, bytes_speedup, largest_batch, longest_context
from kvbench.evaluation.leaderboard import deployment_rows
from kvbench.policy import make_policy
from kvbench.runtime import models
from kvbench.runtime.engine import Engine

# 2 full-attention layers and one sliding layer of window 16: 2 · 2 KV heads · 8 dims · 4 bytes = 128 bytes a layer
SHAPE = ModelShape(kv_heads=2, head_dim=8, windows=[None, None, 16], dtype_bytes=4, weight_bytes=10**6)


def test_the_shape_of_a_tiny_llama_as_written_down():
    """tests/tiny.py's Llama: hidden 64, 4 heads (head dim 16), 2 KV heads, 3 layers, MLP 96, vocabulary 49,152,
    embeddings tied (counted once): 49,152·64 + 3·(64·64·2 + 64·32·2 + 3·64·96 + 2·64) + 64 = 3,238,336 float32."""
    shape = ModelShape.of(tiny.build("llama", "sdpa"))
    assert (shape.kv_heads, shape.head_dim, shape.windows, shape.dtype_bytes) == (2, 16, [None] * 3, 4)
    assert shape.layer_token_bytes == 2 * 2 * 16 * 4 and shape.weight_bytes == 4 * 3_238_336
    assert shape.per_layer_type() == f"{3 * 256:,}"


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3_text: two sliding layers of window 16
def test_the_full_cache_the_engine_counts_is_the_shape_times_the_tokens(arch):
    model = tiny.build(arch, tiny.reference_attention(arch))
    shape = ModelShape.of(model)
    got = Engine(model, models.load_tokenizer(), prefill_chunk=64).generate(list(range(20, 120)), make_policy("full"),
                                                                         6, ignore_eos=True)
    seen = max(got.cache.active_tokens)
    assert seen > 16 and got.cache.full_bytes == got.cache.active_bytes == shape.kv_bytes(seen)


def test_context_batch_speedup_and_repayment_follow_their_formulas():
    assert SHAPE.layer_token_bytes == 128 and SHAPE.kv_bytes(10) == 128 * 30 and SHAPE.kv_bytes(100) == 128 * 215
    assert SHAPE.per_layer_type() == "full 2 × 128 = 256 · sliding (w=16) 1 × 128 = 128"
    # 0.25 · 128 · (2n + 15) <= 2^20  <=>  n <= (2^15 − 15) / 2 = 16,376.5
    assert longest_context(SHAPE, 0.25, cap=2**20) == 16_376
    assert longest_context(ModelShape(2, 8, [16, 16], 4, 0), 0.5) is None  # only sliding layers: any length fits
    assert largest_batch(SHAPE, 0.5, context=100, cap=2**20) == 76  # 2^20 / (0.5 · 27,520) = 76.2
    assert bytes_speedup(3e8, 1e8, 0.75) == pytest.approx(4 / 3.25) and bytes_speedup(3e8, 1e8, 0.0) == 1.0
    assert break_even(300, 50, 100, 90) == 5.0  # 200 ms more prefill, 40 ms less per question
    assert break_even(300, 95, 100, 90) is None and break_even(90, 50, 100, 90) == 0.0


def record(method: str, peak: float, compression: float, decode_ms: float, query: str = "in-prompt") -> dict:
    metrics = {"accuracy": {}, "metric": {}, "kv_compression": compression, "peak_kv_bytes": peak,
               "full_kv_bytes": 1e8, "decode_ms_p50": decode_ms}
    samples = [{"task": "t", "id": "t-0", "score": None, "context_prefill_ms": 100.0 if method == "full" else 300.0,
                "prefill_ms": 10.0, "decode_ms": [40.0, 40.0] if method == "full" else [20.0, 20.0]}]
    return {"method": method, "variant": "", "budget": None, "positions": "original", "query": query,
            "schedule": None, "hosts": ["h"], "metrics": metrics, "samples": samples,
            "model_shape": SHAPE.to_json()}


def test_a_rows_deployment_columns_are_the_formulas_at_its_measured_bytes():
    full, row = record("full", 4e8, 0.0, 50.0, "reuse"), record("snapkv", 1e8, 0.75, 40.0, "reuse")
    line, headers, table = deployment_rows([full, row]) or ("", [], [])
    assert "full 2 × 128 = 256 · sliding (w=16) 1 × 128 = 128" in line
    got = dict(zip(headers, table[1], strict=True))
    # peak 1e8 / 4e8 = 0.25 of full's: 0.25 · 128 · (2n + 15) <= 2^30  <=>  n <= 16,777,208.5
    assert got["KV kept (end)"] == "0.250" and got["KV kept (peak)"] == "0.250"
    # 4,096 tokens: 128 · (2 · 4096 + 15) = 1,050,496 bytes, a quarter kept: 2^30 / 262,624 = 4,088.5 sequences
    assert got["longest context @ 1 GiB"] == "16,777,208" and got["batch of 4096 @ 1 GiB"] == "4,088"
    assert got["decode speed-up: bytes allow"] == f"{(1e6 + 1e8) / (1e6 + 0.25e8):.2f}" and got["measured"] == "1.25"
    assert got["questions to repay prefill"] == "5.0"  # (300 − 100) / ((10 + 80) − (10 + 40))
    assert dict(zip(headers, table[0], strict=True))["measured"] == "1.00"
    assert deployment_rows([row]) is None  # no full row: nothing to refer to
    assert deployment_rows([{k: v for k, v in full.items() if k != "model_shape"}, row]) is None  # an older record


def test_the_deployment_rows_are_ranked_as_the_main_table_where_samples_rank_them():
    """Rows scored per sample rank by their paired difference with the full cache (`leaderboard.ranking`): the
    deployment table lists them in that order with the same rank column, whatever order the sweep gave."""
    full, worse = record("full", 4e8, 0.0, 50.0), record("snapkv", 1e8, 0.75, 40.0)
    full["samples"] = [{**full["samples"][0], "id": f"t-{i}", "score": 1.0} for i in range(12)]
    worse["samples"] = [{**worse["samples"][0], "id": f"t-{i}", "score": 0.0} for i in range(12)]
    for r in (full, worse):
        r["metrics"]["metric"] = {"t": "exact_match"}
    _, headers, table = deployment_rows([worse, full]) or ("", [], [])
    assert headers[:2] == ["rank", "method"] and [row[:2] for row in table] == [["1", "full"], ["2", "snapkv"]]
