"""Each method's kept set on hand-built inputs equals the set its definition gives."""

import torch

from conftest import driver, feed, make_cache
from kvbench.policy import Phase, make_policy


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


def kept(cache, head: int = 0) -> list[int]:
    return sorted(cache.layers[0].positions[0, head].tolist())


def test_attentiontop_keeps_top_r_share_by_cumulative_attention():
    cache = make_cache(make_policy("attentiontop", 4, r=0.75))
    feed(cache, 0, 0, 6, attn=attn_rows([[0.3, 0.05, 0.2, 0.1, 0.25, 0.1], [0.3, 0.05, 0.2, 0.1, 0.25, 0.1]]))
    assert kept(cache) == [0, 2, 3, 4, 5] == kept(cache, 1)  # ceil(0.75 * 6) = 5: only token 1 goes


def test_gist_keeps_a_contiguous_initial_block_and_the_recent_window():
    cache = make_cache(make_policy("gist", 5, sinks=2))
    feed(cache, 0, 0, 10)
    assert kept(cache) == [0, 1, 7, 8, 9]


def test_tova_drops_what_the_last_query_attends_to_least_averaged_over_heads():
    cache = make_cache(make_policy("tova", 3))
    feed(cache, 0, 0, 5, attn=attn_rows([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.0, 0.1, 0.4, 0.2]]))
    assert kept(cache) == [0, 1, 3] == kept(cache, 1)  # means: .2 .25 .1 .3 .15


def test_knorm_keeps_the_lowest_norm_keys_per_head():
    cache = make_cache(make_policy("knorm", 2))
    norms = torch.tensor([[5.0, 1.0, 3.0, 0.5], [0.1, 9.0, 0.2, 4.0]])
    keys = torch.zeros(1, 2, 4, 4)
    keys[0, :, :, 0] = norms
    feed(cache, 0, 0, 4, keys=keys, prefill=True)
    assert kept(cache, 0) == [1, 3] and kept(cache, 1) == [0, 2]


def keys_with_norms(norms: list[float], heads: int = 2) -> torch.Tensor:
    keys = torch.zeros(1, heads, len(norms), 4)
    keys[0, :, :, 0] = torch.tensor(norms)
    return keys


def test_knorm_while_decoding_keeps_the_newest_tokens_whatever_their_norm():
    """Schedule decode: a just-generated token with the largest key norm would be the first evicted by the bare
    rule; the newest `recent` stay, the rest of the budget goes to the lowest norms."""
    cache = make_cache(make_policy("knorm", 3, schedule="decode", recent=1))
    feed(cache, 0, 0, 5, keys=keys_with_norms([1.0, 4.0, 2.0, 5.0, 3.0]), prefill=True)
    assert kept(cache) == [0, 2, 4]
    feed(cache, 0, 5, 1, keys=keys_with_norms([9.0]))
    assert kept(cache) == [0, 2, 5]  # 5 stays although its norm is the largest; 4 (norm 3) goes
    bare = make_cache(make_policy("knorm", 3, schedule="decode", recent=0))
    feed(bare, 0, 0, 5, keys=keys_with_norms([1.0, 4.0, 2.0, 5.0, 3.0]), prefill=True)
    feed(bare, 0, 5, 1, keys=keys_with_norms([9.0]))
    assert kept(bare) == [0, 2, 4]


def test_knorm_by_default_compresses_the_prompt_only_as_kvpress_does():
    cache = make_cache(make_policy("knorm", 3))
    feed(cache, 0, 0, 5, keys=keys_with_norms([1.0, 4.0, 2.0, 5.0, 3.0]), prefill=True)
    feed(cache, 0, 5, 1, keys=keys_with_norms([0.5]))
    assert kept(cache) == [0, 2, 4, 5]  # decoding appends, nothing is evicted


def snap_rows(votes: list[list[float]]) -> torch.Tensor:
    """Observation-window attention whose per-head vote sums are `votes`: [1, K, 1, 1, n]."""
    return torch.tensor(votes)[None, :, None, None, :]


def test_snapkv_without_pooling_keeps_top_votes_per_head_plus_window():
    cache = make_cache(make_policy("snapkv", 4, window=2, kernel=1))
    feed(cache, 0, 0, 8, prefill=True, attn=snap_rows([[0.1, 0.0, 0.5, 0.0, 0.3, 0.0, 0.05, 0.05],
                                                        [0.0, 0.6, 0.0, 0.0, 0.0, 0.3, 0.05, 0.05]]))
    assert kept(cache, 0) == [2, 4, 6, 7] and kept(cache, 1) == [1, 5, 6, 7]


def test_snapkv_pooling_keeps_the_neighbours_of_a_peak():
    cache = make_cache(make_policy("snapkv", 5, window=2, kernel=3))
    votes = [0.01, 0.0, 0.9, 0.0, 0.02, 0.0, 0.0, 0.0, 0.03, 0.04]
    feed(cache, 0, 0, 10, prefill=True, attn=snap_rows([votes, votes]))
    assert kept(cache) == [1, 2, 3, 8, 9]


def test_snapkv_pools_in_position_order_whatever_the_order_of_the_rows():
    """After an eviction a layer's rows are no longer in position order; pooling over rows would mix unrelated
    tokens. A view whose rows are shuffled must keep the same positions as the same view in order."""
    from kvbench.policy import LayerView

    gen = torch.Generator().manual_seed(0)
    n, heads = 24, 2
    positions = torch.arange(100, 100 + n).expand(1, heads, n)
    attn = torch.rand(1, heads, 1, 1, n, generator=gen) ** 4  # peaky votes, so pooling decides
    keys = torch.randn(1, heads, n, 4, generator=gen)

    def kept_positions(order: torch.Tensor) -> list[list[int]]:
        view = LayerView(0, 1, keys[:, :, order], keys[:, :, order], positions[:, :, order].contiguous(), 1, 124,
                         attn[..., order], {}, full_tokens=124)
        keep = make_policy("snapkv", 10, window=2, kernel=5).step(view).keep
        return [sorted(view.positions[0, h][keep[0, h]].tolist()) for h in range(heads)]

    in_order = kept_positions(torch.arange(n))
    shuffled = kept_positions(torch.randperm(n, generator=gen))
    assert shuffled == in_order and all(len(h) == 10 for h in in_order)
    # pooling matters here: without it (kernel 1) the kept set is a different one
    view = LayerView(0, 1, keys, keys, positions, 1, 124, attn, {}, full_tokens=124)
    assert make_policy("snapkv", 10, window=2, kernel=1).step(view).keep[0, 0].nonzero().flatten().add(100).tolist() \
        != in_order[0]


def test_snapkv_avg_pooling_is_kvpress_zero_padded_mean():
    """pooling=avg: each vote becomes the mean of the kernel around it, zero-padded at the ends (the window's
    own votes count as zero), as kvpress's avg_pool1d over the votes before the window."""
    cache = make_cache(make_policy("snapkv", 4, window=2, kernel=3, pooling="avg"))
    votes = [0.0, 0.3, 0.3, 0.0, 0.1, 0.0, 0.9, 0.9]  # pooled (first six): .1 .2 .2 .133 .033 .033
    feed(cache, 0, 0, 8, prefill=True, attn=snap_rows([votes, votes]))
    assert kept(cache) == [1, 2, 6, 7]  # pooling the window's votes in would have given 5 (.9 + .1) / 3 = .33


def test_snapkv_leaves_decode_alone():
    cache = make_cache(make_policy("snapkv", 4, window=2))
    feed(cache, 0, 0, 3)  # a decode-time step never asks for attention or evicts
    assert driver(cache).attn_rows == 0 and kept(cache) == [0, 1, 2]


def test_pyramidkv_budgets_shrink_linearly_with_depth_and_average_the_budget():
    from kvbench.policy import LayerView

    policy = make_policy("pyramidkv", 64, beta=20)
    caps = [policy.layer_capacity(LayerView(i, 30, None, None, None, 0, 1000, None, {}, full_tokens=1000))
            for i in range(30)]
    assert caps[0] == round(2 * 64 - 3.2) and caps[-1] == round(3.2)
    assert all(a > b for a, b in zip(caps, caps[1:], strict=False))
    assert abs(sum(caps) / 30 - 64) < 1


def test_lethe_prunes_to_salient_sinks_and_recent_when_attention_drops_off():
    policy = make_policy("lethe", 10, sinks=1, recent=0.2, mass=0.9, dropoff=0.5)
    cache = make_cache(policy)
    row = [0.0] * 20
    row[5], row[11] = 0.6, 0.35  # two tokens hold 95% of the attention
    feed(cache, 0, 0, 20, attn=attn_rows([row, row]))
    assert kept(cache) == [0, 5, 11, 18, 19]  # salient {5, 11} + sink {0} + recent 20% of 10 = {18, 19}
    assert "0" in policy.report()["hoyer_by_layer"]


def test_lethe_keeps_everything_and_doubles_its_threshold_when_attention_is_flat():
    policy = make_policy("lethe", 10)
    cache = make_cache(policy)
    feed(cache, 0, 0, 20, attn=attn_rows([[0.05] * 20, [0.05] * 20]))
    assert kept(cache) == list(range(20))
    assert policy.report()["threshold_doublings"] == 1
    feed(cache, 0, 20, 1, attn=attn_rows([[0.05] * 21, [0.05] * 21]))  # 21 <= doubled threshold 20? no: 21 > 20
    assert policy.report()["threshold_doublings"] == 2


def test_kvzip_keeps_the_context_tokens_the_repeat_queries_attend_to_most():
    cache = make_cache(make_policy("kvzip", 3))
    feed(cache, 0, 0, 6, prefill=True)  # the prompt: no scores yet, nothing evicted
    assert kept(cache) == list(range(6)) and driver(cache).attn_rows == 0
    # two scratch steps; per head, the max over repeat queries is what counts
    feed(cache, 0, 6, 1, phase=Phase.RECONSTRUCT, attn=attn_rows([[0.1, 0.5, 0.0, 0.1, 0.1, 0.0, 0.2],
                                                       [0.0, 0.0, 0.6, 0.0, 0.3, 0.0, 0.1]]))
    assert driver(cache).attn_rows > 0
    feed(cache, 0, 7, 1, phase=Phase.RECONSTRUCT, attn=attn_rows([[0.0, 0.0, 0.0, 0.4, 0.0, 0.35, 0.1, 0.15],
                                                       [0.5, 0.0, 0.0, 0.0, 0.1, 0.0, 0.2, 0.2]]))
    cache.drop_from(6)
    layer = cache.layers[0]
    assert layer.seen == 6 and layer.active.n == 6  # scratch gone, not counted as evicted
    driver(cache).compress()
    assert kept(cache, 0) == [1, 3, 5] and kept(cache, 1) == [0, 2, 4]
    assert layer.evicted == 3
