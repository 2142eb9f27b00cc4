"""Tiny, seeded, randomly initialised models of each supported architecture, built from transformers'
own config classes. They test mechanics (the engine against transformers on the same weights) and are
never reported as results. Windows are short (16) so that prompts of ~50 tokens run past them."""

from __future__ import annotations

import torch
import transformers

WINDOW = 16
_COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2, tie_word_embeddings=True)
_SLIDING = ["sliding_attention", "sliding_attention", "full_attention"]

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=True,
                                              sliding_window=WINDOW, max_window_layers=1),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16),
    # a small cap (the real models use 50) so that soft-capping changes the scores of random weights
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=16, sliding_window=WINDOW, layer_types=_SLIDING,
                                                attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**{**_COMMON, "num_key_value_heads": 1}, head_dim=16,
                                                         sliding_window=WINDOW, layer_types=_SLIDING,
                                                         query_pre_attn_scalar=16),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, sliding_window=WINDOW, pad_token_id=0),
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON),
}

# attention transformers itself generates with for the reference: SDPA, except where SDPA refuses a
# feature the model uses (Gemma 2's logit soft-capping: transformers' SDPA path raises on it)
REFERENCE_ATTENTION = {"gemma2": "eager"}


def build(arch: str, attention: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `arch` with weights drawn from `seed`, running `attention`, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attention)
    return model.float().eval()


def reference_attention(arch: str) -> str:
    return REFERENCE_ATTENTION.get(arch, "sdpa")


def wide_llama(seed: int) -> torch.nn.Module:
    """The tiny Llama with heads of 64 channels (transformers' quanto cache groups 64 consecutive elements: one
    token's head there), SDPA, weights drawn from `seed`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**_COMMON, "head_dim": 64})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
