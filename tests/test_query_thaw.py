"""ASR-KF-EGR's query-driven thaw (kvbench's option): frozen keys scored against each step's queries before the
layer attends, and thawed for that very attention. Tiny random models (mechanics, not results)."""

import pytest
import torch

import tiny
from conftest import driver, make_cache
from kvbench.policy import Phase, make_policy
from kvbench.runtime.attention import Shape, attention_rows, frozen_attention
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import Engine

PROMPT = "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(6))
FREEZE_ALL = {"window": 1, "sinks": 1, "tau": 1e6, "recovery": False}  # everything older than 1 token is low


@pytest.fixture(scope="module")
def llama():
    from kvbench.runtime import models

    return Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=16)


def test_frozen_probabilities_are_one_softmax_over_frozen_and_active_keys():
    torch.manual_seed(0)
    query, key, frozen = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 5, 8)
    probs = frozen_attention(query, key, frozen, torch.arange(5)[None, None], Shape(0.35), None, 0)
    joint = attention_rows(query, torch.cat([frozen, key], dim=2), 3, 0.35)  # frozen first: older than every query
    torch.testing.assert_close(probs, joint[..., :5])
    manual = (query.view(1, 2, 2, 3, 8) @ frozen[:, :, None].transpose(-1, -2) * 0.35).exp()
    q_rows = query.view(1, 2, 2, 3, 8)
    visible_active = [(q_rows @ key[:, :, None, : 10 - 3 + r + 1].transpose(-1, -2))[..., r, :] for r in range(3)]
    total = [manual[..., r, :].sum(-1) + (v * 0.35).exp().sum(-1) for r, v in enumerate(visible_active)]
    torch.testing.assert_close(probs, manual / torch.stack(total, dim=-1)[..., None])


def test_a_sliding_window_hides_frozen_tokens_outside_it():
    cache = make_cache(make_policy("asrkf"), layers=1)
    cache.layers[0].window = 4
    layer = cache.layers[0]
    driver(cache).begin(torch.tensor([[9, 10, 11]]), Phase.PREFILL)
    layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))  # active: positions 9, 10, 11
    cache.pending_positions = torch.tensor([[10, 11]])  # the queries: the last two
    frozen_positions = torch.tensor([[[6, 7, 8]]]).expand(1, 2, 3)
    probs = frozen_attention(torch.randn(1, 4, 2, 8), layer.keys, torch.randn(1, 2, 3, 8), frozen_positions,
                             Shape(0.35, window=4), driver(cache), 0)
    # query 10 sees 7..10, query 11 sees 8..11: position 6 is hidden from both, 7 from the second
    assert bool((probs[..., 0, 0] == 0).all()) and bool((probs[..., 1, :2] == 0).all())
    assert bool((probs[..., 0, 1:] > 0).all()) and bool((probs[..., 1, 2] > 0).all())


def test_a_threshold_near_zero_thaws_everything_each_step_so_answers_are_the_full_caches(llama):
    ids = encode_chat(llama.tokenizer, PROMPT)
    full = llama.generate(ids, make_policy("full"), max_new_tokens=8, ignore_eos=True, return_logits=True)
    thawing = llama.generate(ids, make_policy("asrkf", **FREEZE_ALL, query_thaw=1e-30), max_new_tokens=8,
                             ignore_eos=True, return_logits=True)
    assert thawing.cache.freezes > 0 and thawing.cache.thaws > 0  # tokens do freeze after each step
    assert thawing.cache.frozen_scored > 0
    assert thawing.tokens == full.tokens
    for got, want in zip(thawing.logits, full.logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # every step attended every token


def test_a_threshold_no_query_reaches_thaws_nothing_beyond_the_plain_method(llama):
    ids = encode_chat(llama.tokenizer, PROMPT)
    plain = llama.generate(ids, make_policy("asrkf", **FREEZE_ALL), max_new_tokens=8, ignore_eos=True)
    strict = llama.generate(ids, make_policy("asrkf", **FREEZE_ALL, query_thaw=0.999999), max_new_tokens=8,
                            ignore_eos=True)
    assert strict.tokens == plain.tokens and strict.cache.thaws == plain.cache.thaws
    assert strict.cache.frozen_scored > 0 and plain.cache.frozen_scored == 0


def test_thaw_on_prompt_restores_every_frozen_token_before_a_prompt_chunk():
    from test_asrkf import frozen_positions, step

    for thaw_on_prompt in (False, True):
        cache = make_cache(make_policy("asrkf", window=2, sinks=1, thaw_on_prompt=thaw_on_prompt))
        for pos in range(20):
            step(cache, pos, {3: 0.0, 5: 0.0})
        assert frozen_positions(cache)
        driver(cache).begin(torch.tensor([[20]]), Phase.PREFILL)
        assert bool(frozen_positions(cache)) != thaw_on_prompt
