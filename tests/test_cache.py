"""PolicyCache mechanics on synthetic tensors: real eviction, freeze/thaw, accounting."""

import pytest
import torch

from conftest import feed, make_cache
from kvbench.policy import Decision, KVPolicy, LayerView
from kvbench.rows import FEW_ROWS


class Scripted(KVPolicy):
    """Applies one pre-set decision on the next step, then nothing."""

    def __init__(self):
        super().__init__()
        self.next: Decision | None = None

    def step(self, view: LayerView) -> Decision | None:
        d, self.next = self.next, None
        return d


def test_eviction_really_frees_bytes():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 10)
    full_bytes = cache.active_bytes
    assert full_bytes == 2 * 1 * 2 * 10 * 4 * 4  # K and V, B=1, 2 heads, 10 tokens, dim 4, fp32
    policy.next = Decision(keep=torch.arange(11) % 2 == 0)  # keep even tokens among 11
    feed(cache, 0, 10, 1)
    layer = cache.layers[0]
    assert sorted(layer.positions[0, 0].tolist()) == [0, 2, 4, 6, 8, 10]
    assert cache.active_bytes == 2 * 6 * 2 * 4 * 4
    assert cache.peak_active_bytes == 2 * 11 * 2 * 4 * 4
    assert layer.evicted == 5 and layer.seen == 11


def test_evicted_rows_are_given_back_to_the_allocator():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 400)
    layer = cache.layers[0]
    reserved = layer.active.k.untyped_storage().nbytes()
    assert reserved >= 400 * 2 * 4 * 4
    policy.next = Decision(keep=torch.arange(401) >= 380)  # keep the last 21
    feed(cache, 0, 400, 1)
    assert layer.active.n == 21
    assert layer.active.k.untyped_storage().nbytes() < reserved / 4  # a smaller buffer: bytes really gone
    assert cache.reserved_bytes == layer.active.reserved_bytes


def test_per_head_decisions_keep_separate_sets():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 4)
    keep = torch.tensor([[[True, False, True, False, False], [False, True, False, False, True]]])
    policy.next = Decision(keep=keep)
    k_new, _ = feed(cache, 0, 4, 1)
    layer = cache.layers[0]
    assert [sorted(p) for p in layer.positions[0].tolist()] == [[0, 2], [1, 4]]
    row = layer.positions[0, 1].tolist().index(4)
    assert torch.equal(layer.keys[0, 1, row], k_new[0, 1, 0])


@pytest.mark.parametrize("start, fewest", [(40, 1), (300, FEW_ROWS + 1)])  # row copies / vectorised moves
def test_per_head_evictions_keep_each_heads_own_tokens_and_data(start, fewest):
    """Many steps of different per-head evictions (rows shuffled by earlier moves): every head keeps exactly
    the tokens it was told to, each with the K/V it was fed."""
    policy = Scripted()
    cache = make_cache(policy)
    gen = torch.Generator().manual_seed(3)
    fed_k, fed_v = feed(cache, 0, 0, start, heads=3, gen=gen)
    expected = [set(range(start)) for _ in range(3)]
    layer = cache.layers[0]
    for step in range(25):
        n = layer.active.n + 1
        drop = fewest + step % 3
        keep = torch.ones(1, 3, n, dtype=torch.bool)
        for h in range(3):
            keep[0, h, torch.randperm(n - 1, generator=gen)[:drop]] = False  # never the new token
        rows = layer.positions[0].tolist()
        policy.next = Decision(keep=keep)
        k, v = feed(cache, 0, start + step, 1, heads=3, gen=gen)
        fed_k, fed_v = torch.cat([fed_k, k], 2), torch.cat([fed_v, v], 2)
        for h in range(3):
            expected[h] = (expected[h] - {rows[h][i] for i in range(n - 1) if not keep[0, h, i]}) | {start + step}
    for h in range(3):
        pos = layer.positions[0, h]
        assert set(pos.tolist()) == expected[h]
        assert torch.equal(layer.keys[0, h], fed_k[0, h, pos]) and torch.equal(layer.values[0, h], fed_v[0, h, pos])
    assert layer.evicted == sum(fewest + s % 3 for s in range(25))


def test_unequal_per_head_counts_are_refused():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 3)
    policy.next = Decision(keep=torch.tensor([[[True, True, False, True], [True, False, False, False]]]))
    try:
        feed(cache, 0, 3, 1)
    except ValueError as err:
        assert "same number of tokens" in str(err)
    else:
        raise AssertionError("unequal per-head keep counts were accepted")


def test_freeze_then_thaw_is_bit_exact_and_accounted():
    policy = Scripted()
    cache = make_cache(policy)
    k0, v0 = feed(cache, 0, 0, 6)
    layer = cache.layers[0]
    freeze = torch.tensor([False, True, False, True, False, False, False])
    policy.next = Decision(keep=~freeze, freeze=freeze)
    feed(cache, 0, 6, 1)
    assert sorted(layer.frozen.positions()[0, 0].tolist()) == [1, 3]
    assert layer.get_seq_length() == 5 and layer.frozen.n == 2
    assert cache.frozen_bytes == 2 * 2 * 2 * 4 * 4
    assert cache.stats().offload.count == 1
    policy.next = Decision(thaw=torch.tensor([True, True]))
    feed(cache, 0, 7, 1)
    assert layer.frozen.n == 0 and cache.frozen_bytes == 0
    order = layer.positions[0, 0].tolist()
    for pos in (1, 3):
        i = order.index(pos)
        assert torch.equal(layer.keys[0, :, i], k0[0, :, pos])
        assert torch.equal(layer.values[0, :, i], v0[0, :, pos])
    s = cache.stats()
    assert s.freezes == 2 and s.thaws == 2 and s.restore.count == 1
    assert s.active_tokens[0] + s.frozen_tokens[0] + s.evicted_tokens[0] == s.seen_tokens == 8


def test_keep_and_freeze_overlap_is_refused():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 2)
    policy.next = Decision(keep=torch.tensor([True, True, True]), freeze=torch.tensor([True, False, False]))
    try:
        feed(cache, 0, 2, 1)
    except ValueError as err:
        assert "both kept and frozen" in str(err)
    else:
        raise AssertionError("overlapping keep and freeze were accepted")


def test_per_head_freeze_is_refused_before_anything_moves():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 4)
    layer = cache.layers[0]
    policy.next = Decision(keep=torch.tensor([True, False, True, True, True]),
                           freeze=torch.tensor([False, True, False, False, False]))
    feed(cache, 0, 4, 1)
    assert layer.frozen.n == 1
    per_head = torch.tensor([[[True, False, False, False, False], [False, True, False, False, False]]])
    policy.next = Decision(keep=~per_head, freeze=per_head, thaw=torch.tensor([True]))
    try:
        feed(cache, 0, 5, 1)
    except ValueError as err:
        assert "every KV head" in str(err)
    else:
        raise AssertionError("a per-head freeze mask was accepted")
    # the refused decision lost nothing: the frozen token is still frozen, the rest still active
    assert layer.frozen.positions()[0, 0].tolist() == [1]
    assert sorted(layer.positions[0, 0].tolist()) == [0, 2, 3, 4, 5]


class EditsFrozenStateInPlace(KVPolicy):
    """Freezes position 1 at the first step, then bumps its frozen 'mark' in place on every later step."""

    token_state = ("mark",)

    def step(self, view: LayerView) -> Decision | None:
        if view.frozen_positions is None:
            return Decision(keep=view.positions[0, 0] != 1, freeze=view.positions[0, 0] == 1)
        view.frozen_state["mark"] += 1  # frozen state is a copy: the cache must still keep this edit
        return None


def test_in_place_edits_of_frozen_state_are_kept_and_thaw_carries_them():
    policy = EditsFrozenStateInPlace()
    cache = make_cache(policy)
    feed(cache, 0, 0, 3)
    layer = cache.layers[0]
    for step in range(3):
        feed(cache, 0, 3 + step, 1)
    assert layer.frozen.state_view()["mark"][0, :, 0].tolist() == [3.0, 3.0]
    layer.apply(Decision(thaw=torch.tensor([True])))
    row = layer.positions[0, 0].tolist().index(1)
    assert layer.active.state_view()["mark"][0, :, row].tolist() == [3.0, 3.0]
