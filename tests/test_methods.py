"""Each method's kept set on hand-built inputs equals the set its definition gives."""

import torch

from conftest import feed, make_cache
from kvbench.policy import make_policy


def test_streamingllm_keeps_sinks_and_recent_window():
    cache = make_cache(make_policy("streamingllm", 8, sinks=3))
    for start in range(0, 30, 6):
        feed(cache, 0, start, 6)
        seen = start + 6
        kept = cache.layers[0].positions[0, 0].tolist()
        expected = list(range(seen)) if seen <= 8 else [0, 1, 2, *range(seen - 5, seen)]
        assert sorted(kept) == expected


def attn_rows(scores: list[list[float]]) -> torch.Tensor:
    """Per-KV-head attention of one query: [1, K, 1, 1, n]."""
    return torch.tensor(scores)[None, :, None, None, :]


def test_h2o_keeps_heavy_hitters_plus_recent_per_head():
    cache = make_cache(make_policy("h2o", 4))  # heavy 2 + recent 2
    feed(cache, 0, 0, 7, attn=attn_rows([[0.1, 0.5, 0.0, 0.3, 0.05, 0.05, 0.0],
                                         [0.4, 0.0, 0.0, 0.0, 0.3, 0.3, 0.0]]))
    pos = cache.layers[0].positions[0]
    # head 0: heaviest among tokens 0..4 are 1 (0.5) and 3 (0.3); head 1: 0 (0.4) and 4 (0.3); recent: 5, 6
    assert sorted(pos[0].tolist()) == [1, 3, 5, 6]
    assert sorted(pos[1].tolist()) == [0, 4, 5, 6]


def test_h2o_scores_accumulate_over_steps():
    cache = make_cache(make_policy("h2o", 4))
    feed(cache, 0, 0, 4, attn=attn_rows([[0.7, 0.1, 0.1, 0.1]] * 2))  # under budget: nothing evicted
    # next step: token 1 gets a lot, but token 0's history keeps it ahead
    feed(cache, 0, 4, 1, attn=attn_rows([[0.1, 0.5, 0.0, 0.0, 0.4]] * 2))
    # accumulated: t0 0.8, t1 0.6, t2 0.1, t3 0.1; recent = {3, 4}; heavy = {0, 1}
    layer = cache.layers[0]
    assert sorted(layer.positions[0, 0].tolist()) == [0, 1, 3, 4]
    by_position = dict(zip(layer.positions[0, 0].tolist(), layer.active.state_view()["score"][0, 0].tolist(),
                           strict=True))
    torch.testing.assert_close(torch.tensor([by_position[p] for p in (0, 1, 3, 4)]), torch.tensor([0.8, 0.6, 0.1, 0.4]))
