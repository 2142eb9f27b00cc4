"""Position modes: original (true positions), rerotate (contiguous in-cache positions), naive."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench.kv.rope import Rope
from kvbench.policy import make_policy
from kvbench.runtime.chat import encode_chat

pytestmark = pytest.mark.model
LONG = " ".join(["Tell me about rivers, mountains and the sea."] * 40)


def rope_at(model, keys: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """HF's own RoPE applied to raw keys [1, K, n, d] at the given positions."""
    cos, sin = model.model.rotary_emb(keys, torch.tensor([positions]))
    _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated


def test_rerotating_a_kept_key_equals_rope_applied_at_its_new_position(model_and_tokenizer):
    model, _ = model_and_tokenizer
    raw = torch.randn(1, 3, 4, 64, generator=torch.Generator().manual_seed(0))
    rope = Rope.from_model(model)
    for old, new, atol in (([5, 9, 40, 100], [0, 1, 2, 3], 1e-5), ([900, 4100, 6000, 8000], [0, 1, 2, 3], 1e-3)):
        at_old = rope_at(model, raw, old)
        moved = rope.rotate(at_old, torch.tensor(new) - torch.tensor(old))
        # HF rotates in float32: its own angle error grows with the position, hence the looser bound at 8k
        torch.testing.assert_close(moved, rope_at(model, raw, new), atol=atol, rtol=0)


def test_rerotate_keeps_keys_at_contiguous_in_cache_positions(engine):
    budget = 48
    checked = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            order = layer.active.positions()[0, 0].argsort()
            assert layer.active.rotations()[0, 0][order].tolist() == list(range(layer.active.n))
        checked.append(cache.layers[0].active.n)

    r = engine.generate(encode_chat(engine.tokenizer, LONG), make_policy("streamingllm", budget), max_new_tokens=6,
                        positions="rerotate", on_step=check)
    assert checked[-1] == budget and r.text.strip()


def test_naive_keeps_old_rotations_and_numbers_new_tokens_from_the_shrunk_length(engine):
    budget = 48
    gaps = []

    def check(step):
        cache = step.cache
        layer = cache.layers[0]
        rot, pos = layer.active.rotations()[0, 0], layer.active.positions()[0, 0]
        newest = int(pos.argmax())
        gaps.append(int(pos[newest] - rot[newest]))  # how far the newest token's rotation lags its true position
        old = pos < 4
        assert torch.equal(rot[old], pos[old])  # sinks were rotated at their true positions and stay so

    engine.generate(encode_chat(engine.tokenizer, LONG), make_policy("streamingllm", budget), max_new_tokens=4,
                    positions="naive", on_step=check)
    assert gaps[0] == 0 and gaps[-1] > 100  # positions collapse to the shrunk length


def test_original_positions_never_rotate_away_from_true_positions(engine):
    def check(step):
        cache = step.cache
        for layer in cache.layers:
            assert torch.equal(layer.active.rotations(), layer.active.positions())

    engine.generate(encode_chat(engine.tokenizer, LONG), make_policy("h2o", 48), max_new_tokens=3, on_step=check)


def test_rerotate_refuses_methods_with_per_layer_budgets(engine):
    with pytest.raises(ValueError, match="rerotate needs every layer to hold the same number of tokens"):
        engine.generate(encode_chat(engine.tokenizer, LONG), make_policy("pyramidkv", 48), max_new_tokens=3,
                        positions="rerotate")
