"""The kvbench attention function against a plain reference computation."""

import pytest
import torch

from kvbench.runtime.attention import _sdpa, _weighted_values, attention_rows, kvbench_attention
from kvbench.runtime.syncs import DispatchedOps


def reference(query, key, value, scaling):
    b, h, q, d = query.shape
    kv = key.shape[1]
    key = key.repeat_interleave(h // kv, dim=1)
    value = value.repeat_interleave(h // kv, dim=1)
    n = key.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling
    visible = torch.ones(q, n, dtype=torch.bool).tril(n - q)  # bottom-right causal
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs @ value, probs


def test_chunk_attention_is_bottom_right_causal_with_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 12, 8, generator=g)
    out = _sdpa(q, k, v, 8**-0.5)
    ref, _ = reference(q, k, v, 8**-0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_decode_attention_packs_gqa_correctly():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 1, 8, generator=g)
    k, v = torch.randn(2, 2, 3, 9, 8, generator=g)
    out = _sdpa(q, k, v, 0.3)
    ref, _ = reference(q, k, v, 0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_rows_equal_the_last_rows_of_the_full_matrix():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 6, 7, 8, generator=g), torch.randn(1, 2, 15, 8, generator=g)
    _, probs = reference(q, k, torch.zeros(1, 2, 15, 8), 8**-0.5)
    rows = attention_rows(q, k, 3, 8**-0.5)  # [B, K, G, w, n]
    assert rows.shape == (1, 2, 3, 3, 15)
    torch.testing.assert_close(rows.reshape(1, 6, 3, 15), probs[:, :, -3:, :], atol=1e-6, rtol=1e-5)
    assert torch.all(rows[..., 0, -2:] == 0)  # row 0 of the window cannot see the last two keys


class RowsWanted:
    """Stands in for a PolicyCache: asks for attention rows and keeps what the attention function hands over."""

    reads_queries = False

    def __init__(self, rows):
        self.attn_rows, self.handed = rows, []

    def after_attention(self, layer_idx, attn):
        self.handed.append((layer_idx, attn))


def decode_step(seed: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """One decode query of 6 heads over 11 keys of 2 KV heads (d = 8), and the layer module attending them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 1, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 11, 8, generator=g)
    module = torch.nn.Module()
    module.layer_idx = layer_idx
    return q, k, v, module


def test_decode_output_and_rows_from_one_pass_match_the_reference():
    # a decode step of a policy that reads attention computes the output from the rows it hands over
    q, k, v, module = decode_step(3, layer_idx=4)
    wanted = RowsWanted(32)
    out, _ = kvbench_attention(module, q, k, v, None, scaling=0.4, kvbench_step=wanted)
    ref, probs = reference(q, k, v, 0.4)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    (layer, attn), = wanted.handed
    assert layer == 4 and attn.shape == (1, 2, 3, 1, 11)
    torch.testing.assert_close(attn.reshape(1, 6, 1, 11), probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, _sdpa(q, k, v, 0.4), atol=1e-5, rtol=1e-5)  # same as without a policy


def test_a_float32_decode_step_that_reads_attention_casts_nothing():
    """Where the host decides the step, every dispatched op is a launch: in float32 the probabilities and the output
    are computed without a cast (a no-op `.float()` or `.to()` is still dispatched); in bfloat16 the output comes back
    in the model's dtype."""
    q, k, v, module = decode_step(5, layer_idx=0)
    wanted = RowsWanted(32)
    with torch.inference_mode(), DispatchedOps() as ops:  # as the engine runs a forward
        out, _ = kvbench_attention(module, q, k, v, None, scaling=0.4, kvbench_step=wanted)
    assert out.dtype == torch.float32 and len(wanted.handed) == 1  # the path that reads attention ran
    assert not [name for name in ops.names if name.startswith(("aten.to.", "aten._to_copy."))], ops.names
    half, _ = kvbench_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.4,
                                kvbench_step=RowsWanted(32))
    assert half.dtype == torch.bfloat16 and half.shape == out.shape


@pytest.mark.parametrize("batch,kv_heads,group,q,n,d", [(1, 3, 3, 1, 2064, 64), (1, 1, 4, 1, 700, 256),
                                                         (1, 3, 1, 5, 300, 16), (2, 2, 2, 7, 513, 32),
                                                         (2, 3, 1, 1, 1088, 16)])
def test_weighted_values_are_bit_equal_to_the_values_broadcast_over_each_group(batch, kv_heads, group, q, n, d):
    """The output of a policy's decode step without copying the values per query head is, bit for bit, what the
    broadcast product gave (the record's cells were computed with it), also over the strided rows a cache holds."""
    g = torch.Generator().manual_seed(n)
    attn = torch.rand(batch, kv_heads, group, q, n, generator=g).softmax(-1)
    value = torch.randn(batch, kv_heads, n + 37, d, generator=g)[:, :, :n]  # a cache's rows: a slice of its buffer
    broadcast = torch.matmul(attn, value[:, :, None]).permute(0, 3, 1, 2, 4).reshape(batch, q, kv_heads * group, d)
    assert torch.equal(_weighted_values(attn, value), broadcast)


def eager(query, key, value, scaling, window=None, softcap=None):
    """transformers' eager attention (repeat KV, scale, soft-cap, sliding mask by index, softmax)."""
    b, h, q, d = query.shape
    key = key.repeat_interleave(h // key.shape[1], dim=1)
    value = value.repeat_interleave(h // value.shape[1], dim=1)
    n = key.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qi, ki = torch.arange(n - q, n)[:, None], torch.arange(n)[None]
    visible = (ki <= qi) & ((ki > qi - window) if window else True)
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ value).transpose(1, 2)


def layer_module(idx: int = 0) -> torch.nn.Module:
    module = torch.nn.Module()
    module.layer_idx = idx
    return module


@pytest.mark.parametrize("q,n", [(9, 9), (4, 13), (1, 13)])
def test_sliding_window_and_soft_capping_match_eager_attention(q, n):
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 4, q, 8, generator=g) * 3
    key, value = torch.randn(2, 1, 2, n, 8, generator=g)
    for window, softcap in ((5, None), (None, 2.0), (5, 2.0)):
        out, _ = kvbench_attention(layer_module(), query, key, value, None, scaling=0.35, sliding_window=window,
                                   softcap=softcap)
        torch.testing.assert_close(out, eager(query, key, value, 0.35, window, softcap), atol=1e-5, rtol=1e-5)
    uncapped, _ = kvbench_attention(layer_module(), query, key, value, None, scaling=0.35)
    assert not torch.allclose(out, uncapped, atol=1e-3)  # the features change the output: the test can fail


def test_policy_rows_are_those_of_the_windowed_soft_capped_attention():
    g = torch.Generator().manual_seed(6)
    query, key = torch.randn(1, 4, 6, 8, generator=g) * 3, torch.randn(1, 2, 10, 8, generator=g)
    rows = attention_rows(query, key, 3, 0.35, softcap=2.0, mask=_window(6, 10, 4))
    keys = key.repeat_interleave(2, dim=1)
    scores = torch.tanh(query[:, :, -3:] @ keys.transpose(-1, -2) * 0.35 / 2.0) * 2.0
    expected = scores.masked_fill(~_window(6, 10, 4)[0, :, -3:], float("-inf")).softmax(-1)
    torch.testing.assert_close(rows.reshape(1, 4, 3, 10), expected, atol=1e-6, rtol=1e-5)


def _window(q: int, n: int, w: int) -> torch.Tensor:
    qi, ki = torch.arange(n - q, n)[:, None], torch.arange(n)[None]
    return ((ki <= qi) & (ki > qi - w))[None, None]
