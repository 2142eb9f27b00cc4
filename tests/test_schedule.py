"""When a method's decisions apply (its schedule): once after the prompt, after every prefill chunk, or also at
every decode step. Cache mechanics on synthetic tokens; the engine on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

import tiny
from conftest import driver, feed, make_cache
from kvbench.policy import SCHEDULES, Phase, available, make_policy, policy_class
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import Engine


def active(cache) -> int:
    return cache.layers[0].active.n


@pytest.mark.parametrize("schedule,sizes", [
    ("prompt", [8, 4, 5, 8]),  # nothing until the prompt's last chunk; then decode and a question append
    ("chunk", [4, 4, 5, 8]),  # every prefill chunk; decode and a question append
    ("decode", [4, 4, 4, 4]),  # everywhere
])
def test_each_schedule_applies_decisions_exactly_where_it_says(schedule, sizes):
    cache = make_cache(make_policy("streamingllm", 4, sinks=1, schedule=schedule))
    got = []
    feed(cache, 0, 0, 8, prefill=True, last_chunk=False)
    got.append(active(cache))
    feed(cache, 0, 8, 8, prefill=True, last_chunk=True)
    got.append(active(cache))
    feed(cache, 0, 16, 1)  # a decode step
    got.append(active(cache))
    feed(cache, 0, 17, 3, prefill=True, query=True)  # a question fed after its compressed context
    got.append(active(cache))
    assert got == sizes
    assert cache.layers[0].evicted == 20 - got[-1]  # every token not active was evicted, none lost


def test_no_attention_is_computed_where_a_stateless_method_does_not_decide():
    cache = make_cache(make_policy("tova", 4, schedule="prompt"))
    driver(cache).begin(torch.arange(0, 8)[None], Phase.PREFILL, last_chunk=False)
    assert driver(cache).attn_rows == 0
    driver(cache).begin(torch.arange(8, 16)[None], Phase.PREFILL, last_chunk=True)
    assert driver(cache).attn_rows == 1
    driver(cache).begin(torch.arange(16, 17)[None], Phase.DECODE)
    assert driver(cache).attn_rows == 0


def attn_rows(scores: list[float]) -> torch.Tensor:
    return torch.tensor([scores, scores])[None, :, None, None, :]


def test_h2o_scores_accumulate_over_the_chunks_a_one_shot_schedule_does_not_compress():
    """Schedule prompt: H2O evicts once, but its scores hold every query's attention, the first chunk's too."""
    cache = make_cache(make_policy("h2o", 2, heavy_ratio=1.0, schedule="prompt"))  # all heavy hitters, no window
    feed(cache, 0, 0, 3, prefill=True, last_chunk=False, attn=attn_rows([0.9, 0.05, 0.05]))
    assert active(cache) == 3
    feed(cache, 0, 3, 2, prefill=True, last_chunk=True, attn=attn_rows([0.0, 0.6, 0.0, 0.3, 0.1]))
    # accumulated .9 .65 .05 .3 .1 -> {0, 1}; the last chunk's attention alone would keep {1, 3}
    assert sorted(cache.layers[0].positions[0, 0].tolist()) == [0, 1]


@pytest.mark.parametrize("name", available())
def test_every_method_runs_the_schedules_it_declares_and_refuses_the_others(name):
    cls = policy_class(name)
    budget = 8 if cls.uses_budget else None
    assert cls.default_schedule in cls.schedules and set(cls.schedules) <= set(SCHEDULES)
    assert make_policy(name, budget).schedule == cls.default_schedule
    for schedule in SCHEDULES:
        if schedule in cls.schedules:
            assert make_policy(name, budget, schedule=schedule).config()["schedule"] == schedule
        else:
            with pytest.raises(ValueError, match=f"method '{name}' has no schedule '{schedule}'; its schedules: "
                                                 + ", ".join(cls.schedules)):
                make_policy(name, budget, schedule=schedule)


@pytest.fixture(scope="module")
def engine():
    from kvbench.runtime import models

    return Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=16)


@pytest.mark.parametrize("method,params", [("streamingllm", {}), ("tova", {}), ("knorm", {}), ("h2o", {}),
                                           ("snapkv", {"window": 4})])
def test_on_the_engine_one_shot_schedules_bound_the_prompt_and_let_decoding_append(engine, method, params):
    ids = encode_chat(engine.tokenizer,
                      "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(12)))
    assert len(ids) > 4 * engine.prefill_chunk
    budget = 24
    for schedule in policy_class(method).schedules:
        sizes: list[tuple[bool, int]] = []

        def record(step, sizes=sizes):
            cache = step.cache
            sizes.append((step.phase == Phase.PREFILL, max(layer.get_seq_length() for layer in cache.layers)))

        engine.generate(ids, make_policy(method, budget, schedule=schedule, **params), 5, ignore_eos=True,
                        on_step=record)
        prompt, decode = [n for p, n in sizes if p], [n for p, n in sizes if not p]
        assert prompt[-1] == budget and len(decode) == 4
        if schedule == "prompt":  # the whole prompt stays until its last chunk
            assert prompt[-2] == len(ids) - (len(ids) % engine.prefill_chunk or engine.prefill_chunk)
        else:
            assert max(prompt) == budget
        assert decode == ([budget] * 4 if schedule == "decode" else [budget + i for i in range(1, 5)])


def test_a_decode_interval_evicts_in_blocks_at_every_kth_decode_step():
    """StreamingLLM (budget 4, 1 sink) with decode_interval=3: decode steps 1 and 2 append, step 3 evicts back to
    the budget, keeping what the one-at-a-time run keeps at that step (sinks + the newest: the same rule). The cache
    is at most k − 1 = 2 tokens over budget at a step's end; a prompt and a question are not decode steps."""
    def run(interval: int) -> tuple[list[int], list[list[int]]]:
        cache = make_cache(make_policy("streamingllm", 4, sinks=1, decode_interval=interval))
        feed(cache, 0, 0, 8, prefill=True)
        sizes, kept = [], []
        for step in range(7):
            feed(cache, 0, 8 + step, 1)
            sizes.append(active(cache))
            kept.append(sorted(cache.layers[0].positions[0, 0].tolist()))
        return sizes, kept

    one, blocks = run(1), run(3)
    assert one[0] == [4] * 7 and blocks[0] == [5, 6, 4, 5, 6, 4, 5]
    assert blocks[1][2] == one[1][2] and blocks[1][5] == one[1][5]  # where the block applies: the same kept set
    # the prompt keeps the sink and the newest 3, [0, 5, 6, 7]; steps 1 and 2 append 8 and 9; step 3 evicts 5-7
    assert blocks[1][:3] == [[0, 5, 6, 7, 8], [0, 5, 6, 7, 8, 9], [0, 8, 9, 10]]


@pytest.mark.parametrize("method,params", [("snapkv", {}), ("streamingllm", {"schedule": "prompt"}), ("full", {})])
def test_a_decode_interval_is_refused_where_no_decision_applies_while_decoding(method, params):
    with pytest.raises(ValueError, match="decode_interval=4 spaces the decisions of the decode schedule"):
        make_policy(method, None if method == "full" else 64, decode_interval=4, **params)
