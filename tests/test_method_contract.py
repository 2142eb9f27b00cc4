"""The contract every registered method keeps, checked on each of them alike (kvpress's test over every press):
on a tiny random Llama, generation loses no token (active + frozen + evicted = seen in every layer at every step),
a budgeted method that declares itself bounded holds at most its budget once its schedule has applied (plus the
tokens appended since), and two runs with the same input keep the same tokens and generate the same text."""

from __future__ import annotations

import math

import pytest

import tiny
from kvbench.policy import AcrossLayers, Range, available, make_policy, parameter_range, parameters, policy_class
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import Engine

BUDGET = 24
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine():
    from kvbench.runtime import models

    return Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=16)


def run(engine: Engine, name: str, **params: int) -> tuple[list[int], list[list[list[list[int]]]]]:
    """The generated tokens, and after each forward every layer's kept positions per head."""
    ids = encode_chat(engine.tokenizer,
                      "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(12)))
    assert len(ids) > 4 * BUDGET
    policy = make_policy(name, BUDGET if policy_class(name).uses_budget else None, **params)
    kept: list[list[list[list[int]]]] = []

    def check(step) -> None:
        cache = step.cache
        for layer in cache.layers:
            assert layer.get_seq_length() + layer.frozen.n + layer.evicted == layer.seen, "a token was lost"
        kept.append([[sorted(row) for row in layer.positions[0].tolist()] for layer in cache.layers])

    result = engine.generate(ids, policy, max_new_tokens=NEW_TOKENS, on_step=check, ignore_eos=True)
    return result.tokens, kept


@pytest.mark.parametrize("name", available())
def test_every_method_loses_no_token_keeps_its_budget_and_is_deterministic(engine, name):
    cls = policy_class(name)
    tokens, kept = run(engine, name)
    assert len(tokens) == NEW_TOKENS and len(kept) > NEW_TOKENS
    if cls.uses_budget and cls.bounded:
        # after the last forward: decode-schedule methods apply the budget at every step; one-shot ones once after
        # the prompt, and the answer's tokens are appended after it
        slack = 0 if make_policy(name, BUDGET).schedule == "decode" else NEW_TOKENS - 1
        counts = [max(len(row) for row in layer) for layer in kept[-1]]
        if cls.uniform_layers:
            assert max(counts) <= BUDGET + slack
        else:  # per-layer budgets that average the budget (PyramidKV)
            assert sum(counts) / len(counts) <= BUDGET + slack + 1
    assert run(engine, name) == (tokens, kept)


BLOCK = 3


@pytest.mark.parametrize("name", [m for m in available() if policy_class(m).evicts
                                  and policy_class(m).default_schedule == "decode"])
def test_every_method_evicting_in_blocks_loses_no_token_and_holds_at_most_a_block_over_its_budget(engine, name):
    """decode_interval=3: the same invariants, the budget exceeded by at most the k − 1 tokens since a block."""
    cls = policy_class(name)
    tokens, kept = run(engine, name, decode_interval=BLOCK)
    assert len(tokens) == NEW_TOKENS
    if cls.uses_budget and cls.bounded and cls.uniform_layers:
        assert max(len(row) for layer in kept[-1] for row in layer) <= BUDGET + BLOCK - 1
    assert run(engine, name, decode_interval=BLOCK) == (tokens, kept)


def out_of_range(allowed: Range) -> list[object]:
    """Values a declared range must refuse: past each end (or on an open end), the non-finite, an unknown name."""
    if allowed.choices:
        return ["no-such-choice"]
    bad: list[object] = [float("nan"), float("inf"), float("-inf")]
    if allowed.low is not None:
        bad.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        bad.append(allowed.high if allowed.high_open else allowed.high + 1)
    return bad


@pytest.mark.parametrize("name", available())
def test_every_parameter_declares_its_range_and_values_outside_it_are_refused(name):
    """A value outside a parameter's range is refused when the policy is built (what every front end does before a
    model loads); the default is inside. Only booleans go without a declared range: their type is their range."""
    budget = BUDGET if policy_class(name).uses_budget else None
    for key, f in parameters(name).items():
        if key in ("budget", "schedule") or f.type in ("bool", bool):
            continue
        allowed = parameter_range(f)
        assert allowed is not None, f"{name}.{key} declares no range (use param(default, low=..., high=...))"
        assert allowed.admits(f.default), f"{name}.{key}'s default {f.default!r} is outside {allowed}"
        for value in out_of_range(allowed):
            nonfinite = isinstance(value, float) and not math.isfinite(value)  # an int refuses it by type
            refusal = "(is out of range|is not a valid int)" if nonfinite else "is out of range: it must be "
            with pytest.raises(ValueError, match=rf"{key}=\S+ {refusal}"):
                make_policy(name, budget, **{key: str(value)})


def _decode_run(engine: Engine, name: str, budget: str, across: bool) -> tuple[list[int], list, list, int]:
    """Tokens, each layer's rows (meta: positions, rotations, slots, state) in position order, each layer's active
    count at every step, and the peak active KV, with decode decisions across layers or one layer at a time."""
    ids = encode_chat(engine.tokenizer,
                      "Archive notes. " + " ".join(f"Box {i} holds item {i * 7 % 23}." for i in range(12)))
    session = engine.session(make_policy(name, budget))
    session.step._across = across
    token = int(session.feed(ids).argmax())
    tokens, counts = [], []
    for _ in range(3 * NEW_TOKENS):
        token, _, _ = session.decode_step(token)
        tokens.append(token)
        counts.append([layer.active.n for layer in session.cache.layers])
    rows = []
    for layer in session.cache.layers:
        meta = layer.active.meta[:, :, : layer.active.n]
        order = meta[..., 0].argsort(-1)[..., None].expand(-1, -1, -1, meta.shape[-1])
        rows.append(meta.gather(2, order))
    return tokens, rows, counts, session.cache.ledger.figures()["peak_active_bytes"]


@pytest.mark.parametrize("name", [m for m in available() if issubclass(policy_class(m), AcrossLayers)])
@pytest.mark.parametrize("budget", [str(BUDGET), "0.5"])
def test_every_method_deciding_across_layers_keeps_what_its_per_layer_steps_keep(engine, name, budget):
    """A decode step's decisions taken for every layer at once keep, in every layer and head, the rows (their
    positions, slots and policy state) that the per-layer steps keep, at every step, and generate the same tokens.
    The peak differs only by the decode token every layer holds until the last layer's attention: at most one row
    per layer more (a ratio budget grows during decode, so the peak can fall in a decode step)."""
    import torch

    across, alone = (_decode_run(engine, name, budget, flag) for flag in (True, False))
    assert across[0] == alone[0] and across[2] == alone[2]
    assert all(torch.equal(a, b) for a, b in zip(across[1], alone[1], strict=True))
    config = engine.model.config
    row = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert alone[3] <= across[3] <= alone[3] + (config.num_hidden_layers - 1) * row
