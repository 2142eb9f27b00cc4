"""PolicyCache mechanics on synthetic tensors: real eviction, freeze/thaw, accounting."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import Scripted, driver, feed, make_cache
from kvbench.kv.cache import PolicyCache
from kvbench.kv.layer import RECENT_STEPS
from kvbench.kv.rows import COPIED_MOVES, FEW_ROWS
from kvbench.policy import Decision, KVPolicy, LayerView, Phase
from kvbench.runtime.syncs import HostSyncs


def test_eviction_really_frees_bytes():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 10)
    full_bytes = cache.ledger.active_bytes
    assert full_bytes == 2 * 1 * 2 * 10 * 4 * 4  # K and V, B=1, 2 heads, 10 tokens, dim 4, fp32
    policy.next = Decision(keep=torch.arange(11) % 2 == 0)  # keep even tokens among 11
    feed(cache, 0, 10, 1)
    layer = cache.layers[0]
    assert sorted(layer.positions[0, 0].tolist()) == [0, 2, 4, 6, 8, 10]
    assert cache.ledger.active_bytes == 2 * 6 * 2 * 4 * 4
    assert cache.ledger.peak_active_bytes == 2 * 11 * 2 * 4 * 4
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
    held = layer.active.k.untyped_storage().nbytes()
    assert held >= reserved
    for i in range(RECENT_STEPS - 1):  # kept while one of the last RECENT_STEPS steps ended with 400 rows
        assert layer.active.k.untyped_storage().nbytes() == held
        feed(cache, 0, 401 + i, 1)
    assert layer.active.n == 21 + RECENT_STEPS - 1
    assert layer.active.k.untyped_storage().nbytes() < reserved / 4  # a smaller buffer: bytes really gone
    assert cache.ledger.reserved_bytes == layer.active.reserved_bytes


def test_the_end_of_a_prompt_gives_back_spare_rows_at_once():
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 400, prefill=True)
    reserved = cache.layers[0].active.k.untyped_storage().nbytes()
    policy.next = Decision(keep=torch.arange(401) >= 380)
    feed(cache, 0, 400, 1, prefill=True)  # the prompt's last chunk: shrunk now, not RECENT_STEPS later
    assert cache.layers[0].active.k.untyped_storage().nbytes() < reserved / 4


def test_a_size_that_swings_every_step_keeps_its_buffer():
    """Freeze three tokens in four, thaw them, freeze them again...: the buffer is reallocated neither way."""

    class Swing(KVPolicy):
        def step(self, view: LayerView) -> Decision:
            if view.frozen_positions is not None:
                return Decision(thaw=torch.ones(view.frozen_positions.shape[-1], dtype=torch.bool))
            odd = view.positions[0, 0].remainder(4) != 0
            return Decision(keep=~odd, freeze=odd)

    cache = make_cache(Swing())
    feed(cache, 0, 0, 400)
    feed(cache, 0, 400, 1)  # grows the buffer once, for the 401st token, and freezes 300
    layer = cache.layers[0]
    buffer = layer.active.k.data_ptr()
    for step in range(2 * RECENT_STEPS):
        n = layer.active.n
        feed(cache, 0, 401 + step, 1)
        assert abs(layer.active.n - n) > 200  # a cohort of ~300 tokens moved
        assert layer.active.k.data_ptr() == buffer


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


@pytest.mark.parametrize("shared", [False, True])  # each head its own rows / the same rows in every head
@pytest.mark.parametrize("start, fewest", [(40, 1), (150, COPIED_MOVES + 1), (300, FEW_ROWS + 1)])
def test_per_head_evictions_keep_each_heads_own_tokens_and_data(start, fewest, shared):
    """Many steps of evictions (rows shuffled by earlier moves), by row copies, indexed copies from host lists and
    vectorised moves: every head keeps exactly the tokens it was told to, each with the K/V it was fed."""
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
        if shared:  # the rows the first head drops (the heads hold the same tokens in the same rows)
            keep = keep[:, :1].expand(1, 3, n)
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


@pytest.mark.parametrize("keep_rest", [True, False])  # keep=~freeze spelled out, or keep=None (evict nothing)
def test_freeze_then_thaw_is_bit_exact_and_accounted(keep_rest):
    policy = Scripted()
    cache = make_cache(policy)
    k0, v0 = feed(cache, 0, 0, 6)
    layer = cache.layers[0]
    freeze = torch.tensor([False, True, False, True, False, False, False])
    policy.next = Decision(keep=~freeze if keep_rest else None, freeze=freeze)
    feed(cache, 0, 6, 1)
    assert sorted(layer.positions[0, 0].tolist()) == [0, 2, 4, 5, 6] and layer.evicted == 0
    assert sorted(layer.frozen.positions()[0, 0].tolist()) == [1, 3]
    assert layer.get_seq_length() == 5 and layer.frozen.n == 2
    assert cache.ledger.frozen_bytes == 2 * 2 * 2 * 4 * 4
    assert cache.stats().offload.count == 1
    policy.next = Decision(thaw=torch.tensor([True, True]))
    feed(cache, 0, 7, 1)
    assert layer.frozen.n == 0 and cache.ledger.frozen_bytes == 0
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


class EditsFrozenState(KVPolicy):
    """Freezes position 1 at the first step, then bumps its frozen 'mark' on every later step: in place, by
    replacing the entry, or not at all (`how` = "in place", "replace", "read")."""

    token_state = ("mark",)

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def step(self, view: LayerView) -> Decision | None:
        if view.frozen_positions is None:
            return Decision(keep=view.positions[0, 0] != 1, freeze=view.positions[0, 0] == 1)
        if self.how == "in place":
            view.frozen_state["mark"] += 1  # frozen state is a copy: the cache must still keep this edit
        elif self.how == "replace":
            view.frozen_state["mark"] = view.frozen_state["mark"] + 1
        return None


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("how", ["in place", "replace"])
def test_edits_of_frozen_state_are_kept_and_thaw_carries_them(how, inference):
    policy = EditsFrozenState(how)
    cache = make_cache(policy)
    layer = cache.layers[0]
    with torch.inference_mode(inference):  # the engine runs in inference mode
        feed(cache, 0, 0, 3)
        for step in range(3):
            feed(cache, 0, 3 + step, 1)
        assert layer.frozen.state_view()["mark"][0, :, 0].tolist() == [3.0, 3.0]
        layer.apply(Decision(thaw=torch.tensor([True])))
    row = layer.positions[0, 0].tolist().index(1)
    assert layer.active.state_view()["mark"][0, :, row].tolist() == [3.0, 3.0]


def test_frozen_state_only_read_is_not_written_back():
    cache = make_cache(EditsFrozenState("read"))
    feed(cache, 0, 0, 3)
    store = cache.layers[0].frozen

    class Writes(TorchFunctionMode):  # in-place ops on the store's meta buffer
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = func.__name__
            in_place = name == "__setitem__" or name.endswith("_") and not name.startswith("__")
            if in_place and args[0].untyped_storage().data_ptr() == store.meta.data_ptr():
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Writes() as writes:
        for step in range(3):
            feed(cache, 0, 3 + step, 1)
        assert store.n == 1 and writes.seen == []
        driver(cache).policy.how = "in place"  # the spy does see a write-back
        feed(cache, 0, 6, 1)
        assert writes.seen == ["index_copy_"]
    assert store.state_view()["mark"][0, :, 0].tolist() == [1.0, 1.0]


class Spy(Scripted):
    """Scripted, and keeps each view's positions and attention (what the policy was handed)."""

    def __init__(self):
        super().__init__()
        self.views: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def step(self, view: LayerView) -> Decision | None:
        self.views.append((view.positions.clone(), None if view.attn is None else view.attn.clone()))
        return super().step(view)


def sliding_cache(policy: KVPolicy, window: int) -> PolicyCache:
    return make_cache(policy, 1, windows=(window,))


def by_position(positions: torch.Tensor, q: int = 1) -> torch.Tensor:
    """Attention rows [1, K, 1, q, n] whose value at each key is that key's position / 1000: a column keeps its
    token's identity wherever rows move."""
    return (positions.float() / 1000)[:, :, None, None, :].expand(-1, -1, 1, q, -1).clone()


def test_a_sliding_layer_keeps_the_last_window_minus_one_positions_as_transformers_cache_does():
    cache = sliding_cache(Spy(), window=6)
    layer = cache.layers[0]
    for start, q in ((0, 4), (4, 5), (9, 1), (10, 1), (11, 7)):
        feed(cache, 0, start, q)
        seen = start + q
        assert sorted(layer.positions[0, 0].tolist()) == list(range(max(0, seen - 5), seen))
        assert layer.active.n + layer.expired == seen and layer.evicted == 0
        assert cache.full_bytes() == cache.ledger.active_bytes == layer.active.n * layer.active.row_bytes()
    assert cache.stats().kv_compression == 0 and cache.stats().expired_tokens == [13]


def test_the_policy_sees_only_the_window_with_attention_columns_following_their_tokens():
    policy = Spy()
    cache = sliding_cache(policy, window=5)
    feed(cache, 0, 0, 3)
    policy.next = Decision(keep=torch.tensor([True, False, True, True]))  # a hole: later removals move rows around
    feed(cache, 0, 3, 1, attn=by_position(torch.arange(4)[None, None].expand(1, 2, 4)))
    layer = cache.layers[0]
    for start in range(4, 9):
        before = layer.active.positions()
        full = torch.cat([before, torch.full((1, 2, 1), start)], dim=-1)
        feed(cache, 0, start, 1, attn=by_position(full))
        positions, attn = policy.views[-1]
        assert int(positions.min()) >= start + 1 - 4  # the last w - 1 positions and the new token
        torch.testing.assert_close(attn[:, :, 0, 0], positions.float() / 1000)


def test_frozen_tokens_that_leave_the_window_are_dropped_for_good():
    class FreezeEarly(KVPolicy):
        def step(self, view: LayerView) -> Decision | None:
            return Decision(freeze=view.positions[:, :1] < 3) if view.seen == 6 else None

    cache = sliding_cache(FreezeEarly(), window=6)
    layer = cache.layers[0]
    feed(cache, 0, 0, 5)
    feed(cache, 0, 5, 1)  # seen 6: position 0 leaves the window, then the policy freezes positions 1 and 2
    assert sorted(layer.frozen.positions()[0, 0].tolist()) == [1, 2] and layer.expired == 1
    feed(cache, 0, 6, 1)  # seen 7: position 1 leaves the window, from the frozen store
    assert layer.frozen.positions()[0, 0].tolist() == [2] and layer.expired == 2
    assert layer.active.n + layer.frozen.n + layer.evicted + layer.expired == layer.seen == 7
    assert cache.ledger.frozen_bytes == layer.frozen.row_bytes()


def test_heads_holding_different_tokens_expire_alike_and_the_rest_stays_masked():
    from kvbench.runtime.attention import _visible

    class PerHead(KVPolicy):
        def step(self, view: LayerView) -> Decision | None:
            if view.seen != 6:
                return None
            drop = torch.tensor([4, 1])[None, :, None]  # head 0 drops position 4, head 1 position 1
            return Decision(keep=view.positions != drop)

    cache = sliding_cache(PerHead(), window=6)
    layer = cache.layers[0]
    for start, q in ((0, 5), (5, 1), (6, 1), (7, 1)):
        feed(cache, 0, start, q)
    # window start 3 at seen 8: head 0 held 1 and 2 outside it, head 1 only 2, so each dropped its oldest one
    assert not layer.heads_aligned and layer.expired == 2 and layer.evicted == 1
    held = [sorted(layer.positions[0, h].tolist()) for h in range(2)]
    assert held == [[2, 3, 5, 6, 7], [3, 4, 5, 6, 7]]
    driver(cache).begin(torch.tensor([[8]]), Phase.DECODE)
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    module = torch.nn.Module()
    module.layer_idx = 0
    # the stale position 2 is masked
    visible = _visible(module, 1, layer.active.n, 6, driver(cache), torch.device("cpu"))
    assert [sorted(layer.positions[0, h][visible[0, h, 0]].tolist()) for h in range(2)] == [[3, 5, 6, 7, 8],
                                                                                            [3, 4, 5, 6, 7, 8]]


def test_a_decisions_index_is_the_same_whether_grouped_on_the_host_or_on_the_device():
    """A decode step's few dropped rows are grouped by head on the host (`_index`), a prompt's many on the device
    (`_index_rows`): both give the same indices, and both refuse heads selecting different counts."""
    from kvbench.kv.layer import _index, _index_rows

    gen = torch.Generator().manual_seed(0)
    shape = (1, 3, 12)
    same = (torch.rand(1, 1, 12, generator=gen) < 0.3).expand(shape)
    per_head = torch.zeros(shape, dtype=torch.bool)
    for h in range(3):
        per_head[0, h, torch.randperm(12, generator=gen)[:4]] = True
    for mask in (same, per_head, same[:, :1], torch.zeros(shape, dtype=torch.bool)):
        host, device = _index(mask, shape), _index_rows(mask.expand(shape), shape)
        assert host.shape == device.shape and torch.equal(host, device)
    assert _index(per_head, shape).dim() == 3 and _index(same, shape).dim() == 1
    uneven = per_head.clone()
    uneven[0, 0] = True
    for index in (_index, _index_rows):
        with pytest.raises(ValueError, match="same number of tokens"):
            index(uneven, shape)


@pytest.mark.parametrize("per_head", [False, True])
def test_an_evict_decision_leaves_the_cache_its_keep_mask_leaves(per_head):
    """`Decision(evict=rows)` and `Decision(keep=every other row)` give the same rows in the same order, the same data
    and the same accounting, step after step (a scorer names a decode step's few evicted rows instead of a mask)."""
    gen = torch.Generator().manual_seed(5)
    policies = [Scripted(), Scripted()]
    caches = [make_cache(policy) for policy in policies]
    keys = torch.randn(1, 3, 60, 4, generator=gen)
    for cache in caches:
        torch.manual_seed(0)
        feed(cache, 0, 0, 40, heads=3, keys=keys[:, :, :40])
    for step in range(20):
        n = caches[0].layers[0].active.n + 1
        heads = 3 if per_head else 1
        evict = torch.stack([torch.randperm(n - 1, generator=gen)[: 1 + step % 3] for _ in range(heads)])[None]
        keep = torch.ones(1, heads, n, dtype=torch.bool).scatter_(-1, evict, False)
        policies[0].next, policies[1].next = Decision(evict=evict), Decision(keep=keep)
        for cache in caches:
            torch.manual_seed(step)  # the same values in both caches (`feed` draws them)
            feed(cache, 0, 40 + step, 1, heads=3, keys=keys[:, :, 40 + step : 41 + step])
    a, b = (cache.layers[0] for cache in caches)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert (a.evicted, a.heads_aligned) == (b.evicted, b.heads_aligned) == (sum(1 + s % 3 for s in range(20)),
                                                                             not per_head)
    figures = [{k: v for k, v in cache.ledger.figures().items() if k != "policy_seconds"} for cache in caches]
    assert figures[0] == figures[1]


@pytest.mark.parametrize("evict", [[[[3, 3]]], [[[0, 11]]], [[[-1]]]])
def test_an_evict_decision_naming_a_row_twice_or_outside_the_cache_is_refused_with_nothing_moved(evict):
    policy = Scripted()
    cache = make_cache(policy)
    feed(cache, 0, 0, 10)
    layer = cache.layers[0]
    before = layer.positions.clone()
    policy.next = Decision(evict=torch.tensor(evict))
    with pytest.raises(ValueError, match="distinct rows in 0..10"):
        feed(cache, 0, 10, 1)
    assert torch.equal(layer.positions[..., :10], before) and layer.evicted == 0


def test_an_evict_decision_takes_no_masks():
    with pytest.raises(ValueError, match="either `evict`"):
        Decision(evict=torch.tensor([[[0]]]), keep=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("kind", ["keep", "evict"])
def test_a_decision_across_layers_leaves_each_layer_what_its_own_part_leaves(kind, per_head):
    """`PolicyCache.evict_stacked` reads a [L, ...] decision once and applies each layer's part from the host lists,
    reading the device no more: every layer then holds the rows, data and counts that applying its own slice gives
    (3 layers evicting 2, 3 and 4 rows: row copies and indexed copies; per head: one indexed copy for all heads)."""
    gen = torch.Generator().manual_seed(7)
    layers, heads, n = 3, 3, 30
    caches = [make_cache(Scripted(), layers=layers) for _ in range(2)]
    keys = torch.randn(1, heads, n, 4, generator=gen)
    for cache in caches:
        for i in range(layers):
            torch.manual_seed(i)
            feed(cache, i, 0, n, heads=heads, keys=keys, prefill=True)
    rows = heads if per_head else 1
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(layers * rows)]).view(layers, 1, rows, n)
    keep = [torch.ones(1, rows, n, dtype=torch.bool).scatter_(-1, order[i, ..., : 2 + i], False)
            for i in range(layers)]  # layer i evicts 2 + i rows
    if kind == "evict":  # a decision across layers names the same count in every layer: the first 2 of each
        evict = order[..., :2]
        keep = [torch.ones(1, rows, n, dtype=torch.bool).scatter_(-1, evict[i], False) for i in range(layers)]
        decision = Decision(evict=evict)
    else:
        decision = Decision(keep=torch.stack(keep))
    with HostSyncs() as syncs:
        caches[0].evict_stacked(decision)
    assert syncs.total == (1 if kind == "evict" else 2)  # the decision read once (`tolist`; `nonzero` first for a
    # mask), then each layer's rows moved from the lists without a read of the device: none a GPU would wait for
    for i in range(layers):
        caches[1].layers[i].apply(Decision(keep=keep[i]))
    for a, b, kept in zip(caches[0].layers, caches[1].layers, keep, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
        assert torch.equal(a.values, b.values) and a.evicted == b.evicted == int((~kept[0, 0]).sum())
    figures = [{k: v for k, v in cache.ledger.figures().items() if k != "policy_seconds"} for cache in caches]
    assert figures[0] == figures[1]
