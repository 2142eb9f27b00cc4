"""`Session.rollback`: undoing the last tokens leaves the cache as if they were never fed, so feeding them again
gives the logits of never having rolled back; ASR-KF-EGR's level 4 uses it to regenerate an answer's tokens.
Tiny random models (mechanics, not results)."""

import pytest
import torch

import tiny
from kvbench.policy import make_policy
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import Engine

PROMPT = "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(6))


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.runtime import models

    return models.load_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return Engine(tiny.build("llama", "sdpa"), tokenizer, prefill_chunk=16)


def run_tokens(session, tokens: list[int]) -> list[torch.Tensor]:
    """Feed `tokens` one decode step at a time; the logits after each."""
    return [session.decode_step(t)[1].clone() for t in tokens]


def positions_held(session) -> set[int]:
    held = set()
    for layer in session.cache.layers:
        held |= set(layer.active.positions().flatten().tolist())
        if layer.frozen.n:
            held |= set(layer.frozen.positions().flatten().tolist())
    return held


@pytest.mark.parametrize("method,budget,params", [
    ("full", None, {}),
    # evicts once, after the prompt: the decode steps undone decided nothing, so re-feeding is exact
    ("snapkv", 24, {"schedule": "prompt", "window": 4}),
])
def test_rolling_back_and_feeding_again_gives_the_same_logits_bit_for_bit(llama, method, budget, params):
    ids = encode_chat(llama.tokenizer, PROMPT)
    tokens = [int(t) for t in torch.randint(100, 5000, (10,), generator=torch.Generator().manual_seed(0))]
    reference = llama.session(make_policy(method, budget, **params))
    reference.feed(ids)
    expected = run_tokens(reference, tokens)

    session = llama.session(make_policy(method, budget, **params))
    session.feed(ids)
    run_tokens(session, tokens)
    before = [layer.active.n for layer in session.cache.layers]
    session.rollback(4)
    assert session.seen == len(ids) + 6 and max(positions_held(session)) == len(ids) + 5
    assert [layer.active.n for layer in session.cache.layers] == [n - 4 for n in before]
    again = run_tokens(session, tokens[6:])
    for got, want in zip(again, expected[6:], strict=True):
        assert torch.equal(got, want)
    stats = session.cache.stats()
    assert (stats.rollbacks, stats.rolled_back_tokens) == (1, 4)
    assert stats.evicted_tokens == reference.cache.stats().evicted_tokens


def test_a_rollback_removes_frozen_rows_too(llama):
    """A policy that freezes everything outside a 1-token window: the undone tokens are frozen in most layers."""
    policy = make_policy("asrkf", window=1, sinks=1, tau=1e6, recovery=False)
    session = llama.session(policy)
    ids = encode_chat(llama.tokenizer, PROMPT)
    session.feed(ids)
    run_tokens(session, list(range(200, 210)))
    first = session.seen - 5
    undone = set(range(first, session.seen))
    frozen = set()
    for layer in session.cache.layers:
        frozen |= set(layer.frozen.positions().flatten().tolist()) & undone
    assert frozen, "the test needs undone tokens that are frozen"
    held_before = len(positions_held(session))
    session.rollback(5)
    assert positions_held(session) == set(range(first)) and held_before == first + 5  # nothing evicted, nothing left
    for layer in session.cache.layers:
        assert layer.seen == first and layer.evicted == 0
    run_tokens(session, [7, 8])  # the cache still works
    assert positions_held(session) == set(range(first + 2))


def test_a_sliding_window_refuses_a_rollback_it_cannot_undo_and_a_reserve_makes_it_exact(tokenizer):
    mistral = Engine(tiny.build("mistral", "sdpa"), tokenizer, prefill_chunk=16)
    ids = encode_chat(mistral.tokenizer, "Short note.")
    tokens = list(range(300, 300 + tiny.WINDOW + 8))  # runs past the 16-token window
    session = mistral.session(make_policy("full"))
    session.feed(ids)
    run_tokens(session, tokens)
    seen, rows = session.seen, [layer.active.n for layer in session.cache.layers]
    with pytest.raises(ValueError, match=r"sliding window \(16\) already dropped positions below"):
        session.rollback(3)
    assert session.seen == seen and [layer.active.n for layer in session.cache.layers] == rows  # nothing changed

    reference = mistral.session(make_policy("full"))
    reference.feed(ids)
    expected = run_tokens(reference, tokens)
    never_freezes = make_policy("asrkf", tau=1e-9, recovery=False, regenerate=3)  # full, with a 3-token reserve
    session = mistral.session(never_freezes)
    session.feed(ids)
    run_tokens(session, tokens)
    session.rollback(3)
    for got, want in zip(run_tokens(session, tokens[-3:]), expected[-3:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the reserve rows are masked, not absent


def test_rollback_arguments_are_checked(llama):
    session = llama.session(make_policy("full"))
    session.feed([1, 2, 3])
    for bad in (0, 4):
        with pytest.raises(ValueError, match="cannot roll back"):
            session.rollback(bad)


def test_level_4_regenerates_the_last_tokens_and_counts_them_up_to_the_reply_length(llama):
    """An entropy floor every decode step exceeds: each step escalates (soft, window, full), and every fourth is
    level 4, which undoes 3 tokens; their re-decoding spikes again, so regeneration stops only at its bound: as
    many tokens as the reply may have (5 rollbacks of 3, then one of the 1 left)."""
    ids = encode_chat(llama.tokenizer, PROMPT)
    policy = make_policy("asrkf", window=2, sinks=1, tau=2.0, entropy_floor=1e-3, regenerate=3, escalation_gap=100)
    result = llama.generate(ids, policy, max_new_tokens=16, ignore_eos=True)
    stats, recoveries = result.cache, result.policy_report["recoveries"]
    assert (stats.rollbacks, stats.rolled_back_tokens) == (6, 16)
    assert recoveries["regenerate"] > stats.rollbacks and min(recoveries["soft"], recoveries["full"]) >= 6
    assert len(result.tokens) == 16
    assert len(result.decode_s) == 15 + 16  # undone steps stay in the decode time


def test_batched_decoding_refuses_a_policy_that_rolls_back(llama):
    with pytest.raises(ValueError, match="batched decoding cannot"):
        generate_batch(llama, [[1, 2, 3], [4, 5]], make_policy("asrkf", regenerate=2), max_new_tokens=2)
