"""Property tests (hypothesis) of freeze/thaw in PolicyCache under random schedules."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import driver, make_cache
from kvbench.policy import Decision, KVPolicy, LayerView, Phase


class RandomSchedule(KVPolicy):
    """Freezes and thaws tokens as drawn by hypothesis: one (freeze bits, thaw bits) pair per step."""

    token_state = ("tag",)

    def __init__(self, draws):
        super().__init__()
        self.draws = list(draws)

    def step(self, view: LayerView) -> Decision | None:
        view.state["tag"] = view.positions.float() * 10  # state must follow its token everywhere
        freeze_bits, thaw_bits = self.draws.pop(0) if self.draws else ([], [])
        n = view.n
        freeze = torch.tensor([(freeze_bits[i] if i < len(freeze_bits) else False) for i in range(n)])
        thaw = None
        if view.frozen_positions is not None:
            m = view.frozen_positions.shape[-1]
            thaw = torch.tensor([(thaw_bits[i] if i < len(thaw_bits) else False) for i in range(m)])
        return Decision(keep=~freeze, freeze=freeze, thaw=thaw)


bits = st.lists(st.booleans(), max_size=24)
schedules = st.lists(st.tuples(bits, bits), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(schedule=schedules, chunk=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_random_freeze_thaw_schedules_lose_nothing_and_restore_bit_exact(schedule, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(RandomSchedule(schedule))
    layer = cache.layers[0]
    reference_k, reference_v = {}, {}
    ever_frozen: set[int] = set()
    seen = 0
    for _ in range(len(schedule) + 1):
        driver(cache).begin(torch.arange(seen, seen + chunk)[None], Phase.DECODE)
        k, v = torch.randn(1, 2, chunk, 4, generator=gen), torch.randn(1, 2, chunk, 4, generator=gen)
        for i in range(chunk):
            reference_k[seen + i], reference_v[seen + i] = k[0, :, i], v[0, :, i]
        layer.update(k, v)
        driver(cache).after_attention(0, None)
        driver(cache).end()
        seen += chunk

        active = layer.active.positions()[0, 0].tolist()
        frozen = layer.frozen.positions()[0, 0].tolist() if layer.frozen.n else []
        # every token is in exactly one place, nothing evicted
        assert sorted(active + frozen) == list(range(seen))
        assert layer.evicted == 0
        # K, V and policy state are bit-identical to what entered, wherever the token is now
        for rows, order in ((layer.active, active), (layer.frozen, frozen)):
            if not order:
                continue
            keys, values, tags = rows.keys(), rows.values(), rows.state_view()["tag"]
            for row, pos in enumerate(order):
                assert torch.equal(keys[0, :, row], reference_k[pos])
                assert torch.equal(values[0, :, row], reference_v[pos])
                if pos < seen - chunk:  # tagged by the policy at an earlier step
                    assert tags[0, 0, row] == pos * 10
        row_bytes = 2 * 2 * 4 * 4
        assert cache.ledger.frozen_bytes == layer.frozen.n * row_bytes
        assert cache.ledger.active_bytes == layer.active.n * row_bytes
        # K/V go to the host once per token: a re-freeze reuses the copy, so bytes offloaded and held both
        # equal the number of distinct tokens ever frozen
        ever_frozen.update(frozen)
        assert cache.ledger.offload.bytes == layer.frozen.held_bytes == len(ever_frozen) * row_bytes


@settings(max_examples=30, deadline=None)
@given(schedule=schedules, seed=st.integers(0, 2**16))
def test_attention_after_thawing_everything_equals_a_cache_that_never_froze(schedule, seed):
    gen = torch.Generator().manual_seed(seed)
    policy = RandomSchedule(schedule)
    cache = make_cache(policy)
    layer = cache.layers[0]
    all_k, all_v = [], []
    for step in range(len(schedule)):
        driver(cache).begin(torch.arange(step * 3, step * 3 + 3)[None], Phase.DECODE)
        k, v = torch.randn(1, 2, 3, 4, generator=gen), torch.randn(1, 2, 3, 4, generator=gen)
        all_k.append(k)
        all_v.append(v)
        layer.update(k, v)
        driver(cache).after_attention(0, None)
        driver(cache).end()
    layer.apply(Decision(thaw=torch.ones(layer.frozen.n, dtype=torch.bool)) if layer.frozen.n else Decision())
    order = layer.active.positions()[0, 0].argsort()
    restored_k, restored_v = layer.keys[:, :, order], layer.values[:, :, order]
    never_k, never_v = torch.cat(all_k, dim=2), torch.cat(all_v, dim=2)
    assert torch.equal(restored_k, never_k) and torch.equal(restored_v, never_v)
    q = torch.randn(1, 2, 1, 4, generator=gen)
    assert torch.equal(F.scaled_dot_product_attention(q, restored_k, restored_v),
                       F.scaled_dot_product_attention(q, never_k, never_v))
    # and in the cache's own row order, attention is the same set-function up to rounding
    torch.testing.assert_close(F.scaled_dot_product_attention(q, layer.keys, layer.values),
                               F.scaled_dot_product_attention(q, never_k, never_v))
