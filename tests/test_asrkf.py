"""ASR-KF-EGR on hand-built attention: who is frozen, for how long, and how recovery thaws."""

import math

import torch

from conftest import driver, make_cache
from kvbench.policy import Phase, make_policy


def step(cache, seen: int, attention_by_position: dict[int, float], default: float = 0.2, prefill: bool = False):
    """Append one token at position `seen`; the new query's attention is given per position."""
    layer = cache.layers[0]
    driver(cache).begin(torch.tensor([[seen]]), Phase.PREFILL if prefill else Phase.DECODE)
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    order = layer.active.positions()[0, 0].tolist()
    attn = torch.tensor([attention_by_position.get(p, default) for p in order])[None, None, None, None, :]
    driver(cache).after_attention(0, attn)
    driver(cache).end()


def frozen_positions(cache) -> set[int]:
    layer = cache.layers[0]
    return set(layer.frozen.positions()[0, 0].tolist()) if layer.frozen.n else set()


def test_low_importance_tokens_freeze_with_a_sublinear_schedule_and_thaw_on_time():
    policy = make_policy("asrkf", window=2, sinks=1, tau=0.5, k=1.0, recovery=False)
    cache = make_cache(policy)
    ignored = {0: 0.0, 3: 0.0}  # position 0 is a sink: never frozen however low
    for pos in range(6):
        step(cache, pos, ignored)
    history = []
    for pos in range(6, 40):
        step(cache, pos, ignored)
        history.append(3 in frozen_positions(cache))
        assert 0 not in frozen_positions(cache)
        assert not frozen_positions(cache) & {pos, pos - 1}  # the recent window stays active
    # expected from the definition: at each step where token 3 is active and low (it leaves the recent
    # window at step 5), count += 1 and it is frozen for floor(sqrt(count) / k) steps: it misses the
    # attention of those steps and is thawed at the end of the last one
    expected, count, frozen_until = [], 1, 5 + 1
    for s in range(6, 40):
        if s <= frozen_until:
            expected.append(s != frozen_until)
            continue
        count += 1
        frozen_until = s + math.floor(math.sqrt(count))
        expected.append(True)
    assert history == expected
    lengths = [len(run) for run in "".join("F" if f else "." for f in history).split(".") if run]
    complete = lengths[:-1]  # the last run may be cut off by the end of the loop
    assert complete == sorted(complete) and complete[-1] > complete[0]  # durations grow with detections


def test_nothing_is_frozen_when_attention_is_uniform_and_nothing_is_ever_evicted():
    cache = make_cache(make_policy("asrkf", window=2, sinks=1))
    for pos in range(20):
        step(cache, pos, {}, default=1.0 / (pos + 1))
    layer = cache.layers[0]
    assert layer.frozen.n == 0 and layer.evicted == 0 and layer.active.n == 20


def test_entropy_spikes_escalate_soft_window_full_and_full_reset_thaws_everything():
    policy = make_policy("asrkf", window=2, sinks=1, escalation_gap=8)
    cache = make_cache(policy)
    low = {p: 0.0 for p in range(1, 12)}
    for pos in range(30):
        step(cache, pos, low)
        policy.observe({"entropy": 1.0 + 0.01 * (pos % 3), "step": driver(cache).steps, "phase": "decode"})
    assert frozen_positions(cache)
    for level in ("soft", "window", "full"):
        policy.observe({"entropy": 50.0, "step": driver(cache).steps, "phase": "decode"})
        assert policy.report()["recoveries"][level] == 1
        step(cache, cache.layers[0].seen, low)
    # the full reset thawed every frozen token and cleared detection counts, active and frozen
    counts = cache.layers[0].active.state_view()["count"]
    assert frozen_positions(cache) <= set(range(1, 12))
    assert float(counts.max()) <= 1.0  # only the detection of the reset step itself
    assert cache.layers[0].evicted == 0


def test_spikes_far_apart_do_not_escalate():
    policy = make_policy("asrkf")
    for s in range(20):
        policy.observe({"entropy": 1.0 + 0.01 * (s % 2), "step": s, "phase": "decode"})
    policy.observe({"entropy": 9.0, "step": 20, "phase": "decode"})
    for s in range(21, 60):
        policy.observe({"entropy": 1.0 + 0.01 * (s % 2), "step": s, "phase": "decode"})
    policy.observe({"entropy": 9.0, "step": 60, "phase": "decode"})
    assert policy.report()["recoveries"] == {"soft": 2, "window": 0, "full": 0, "regenerate": 0}


def frozen_at_spike(early_thaw: bool) -> tuple[set[int], set[int]]:
    """Frozen positions just before a full-reset spike, and right after the next step's `begin_step`."""
    policy = make_policy("asrkf", window=2, sinks=1, escalation_gap=8, early_thaw=early_thaw)
    cache = make_cache(policy)
    low = {p: 0.0 for p in range(1, 12)}
    for pos in range(30):
        step(cache, pos, low)
        policy.observe({"entropy": 1.0 + 0.01 * (pos % 3), "step": driver(cache).steps, "phase": "decode"})
    for _ in range(3):  # soft, window, full
        policy.observe({"entropy": 50.0, "step": driver(cache).steps, "phase": "decode"})
        if policy.report()["recoveries"]["full"]:
            break
        step(cache, cache.layers[0].seen, low)
    before = frozen_positions(cache)
    driver(cache).begin(torch.tensor([[cache.layers[0].seen]]), Phase.DECODE)
    return before, frozen_positions(cache)


def test_early_thaw_restores_before_the_next_forward_and_the_default_after_it():
    before, after = frozen_at_spike(early_thaw=True)
    assert before and not after  # the full reset landed before the forward: it attends every token
    before, after = frozen_at_spike(early_thaw=False)
    assert before and after == before  # the default: thawed only after that forward's attention


def test_an_entropy_floor_is_a_spike_without_history_in_decoding_only():
    floor = make_policy("asrkf", entropy_floor=3.0)
    floor.observe({"entropy": 3.5, "step": 1, "phase": "prefill"})  # a prompt's last logits: not a trigger
    assert sum(floor.report()["recoveries"].values()) == 0
    floor.observe({"entropy": 2.5, "step": 2, "phase": "decode"})
    floor.observe({"entropy": 3.5, "step": 3, "phase": "decode"})
    assert floor.report()["recoveries"]["soft"] == 1
    plain = make_policy("asrkf")  # the default: 8 steps of history first
    plain.observe({"entropy": 0.1, "step": 1, "phase": "decode"})
    plain.observe({"entropy": 9.0, "step": 2, "phase": "decode"})
    assert sum(plain.report()["recoveries"].values()) == 0


def test_prefill_freeze_off_freezes_nothing_while_a_prompt_is_read():
    for prefill_freeze in (True, False):
        cache = make_cache(make_policy("asrkf", window=2, sinks=1, prefill_freeze=prefill_freeze))
        for pos in range(12):
            step(cache, pos, {3: 0.0}, prefill=True)
        assert bool(frozen_positions(cache)) == prefill_freeze
        for pos in range(12, 20):
            step(cache, pos, {3: 0.0})
        assert 3 in frozen_positions(cache) or cache.ledger.thaws  # decoding freezes it either way


def test_a_rollback_forgets_the_undone_steps_entropies():
    policy = make_policy("asrkf", min_history=2, sigma=1.0)
    for s, h in enumerate((1.0, 1.1, 1.0, 50.0, 60.0)):
        policy.observe({"entropy": h, "step": s, "phase": "decode"})
    policy.rolled_back(2)  # the two high ones are undone
    assert policy.report()["recoveries"] == {"soft": 1, "window": 1, "full": 0, "regenerate": 0}
    policy.observe({"entropy": 1.5, "step": 9, "phase": "decode"})  # a spike against 1.0, 1.1, 1.0 only
    assert policy.report()["recoveries"]["full"] == 1


def test_bad_parameters_are_refused():
    for bad in ({"window": "0"}, {"tau": "-1"}, {"k": "0"}, {"min_history": "1"}, {"regenerate": "-1"},
                {"entropy_floor": "-2"}):
        try:
            make_policy("asrkf", **bad)
        except ValueError as err:
            assert "asrkf" in str(err)
        else:
            raise AssertionError(f"{bad} accepted")
