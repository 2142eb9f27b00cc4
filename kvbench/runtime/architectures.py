"""Which models the engine reproduces exactly, and what it refuses.

A model is accepted only when its architecture is in `SUPPORTED`: each entry has an equivalence test
(tests/test_architectures.py: `full` through the engine gives transformers' own tokens and logits, past
the sliding window, through chunked prefill, decode, batches and lm-eval scoring). Anything else is
refused by name at load time, never run approximately: a reference row that is silently wrong would
poison every row beside it.

The layer layout comes from transformers' own `get_layer_types_and_kwargs`, the function its
`DynamicCache` builds its layers from, so a sliding layer here is a sliding layer there, with the same
window.
"""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> (name, what the engine does for it beyond plain causal attention)
SUPPORTED: dict[str, tuple[str, str]] = {
    "llama": ("Llama", "plain causal attention (SmolLM2)"),
    "mistral": ("Mistral", "sliding window on every layer when `sliding_window` is set"),
    "qwen2": ("Qwen2", "sliding window above `max_window_layers` when `use_sliding_window`"),
    "qwen3": ("Qwen3", "QK-norm (applied before the cache); sliding layers as Qwen2"),
    "gemma": ("Gemma", "plain causal attention, `query_pre_attn_scalar` scaling"),
    "gemma2": ("Gemma 2", "alternating sliding layers, attention logit soft-capping"),
    "gemma3_text": ("Gemma 3 (text)", "5 sliding layers per global one, per-layer RoPE bases, QK-norm"),
    "phi3": ("Phi-3", "sliding window on every layer when `sliding_window` is set"),
    "olmo2": ("OLMo 2", "QK-norm over the projections (applied before the cache)"),
}

FULL, SLIDING = "full_attention", "sliding_attention"

# config fields that announce an attention the engine cannot reproduce, with the feature's name
_FEATURES = {
    "kv_lora_rank": "multi-head latent attention (compressed KV)",
    "attention_chunk_size": "chunked attention",
    "mamba_expand": "state-space (Mamba) layers",
    "linear_attn_config": "linear attention layers",
}


class UnsupportedModel(ValueError):
    """The engine cannot reproduce this model's attention exactly."""


@dataclass(frozen=True)
class Layout:
    """Per decoder layer: the sliding window (None: full causal attention), as transformers' cache sees it."""

    architecture: str
    windows: tuple[int | None, ...]

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)


def supported_list() -> str:
    return ", ".join(f"{name} ({key})" for key, (name, _) in SUPPORTED.items())


def layout(config) -> Layout:
    """The layer layout of a supported decoder-only model; `UnsupportedModel` naming the feature otherwise."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kind = getattr(config, "model_type", None)
    refuse = f"kvbench cannot run {kind!r} exactly: {{}}. Supported architectures: {supported_list()}"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(refuse.format("encoder-decoder models are not supported"))
    for key, feature in _FEATURES.items():
        if getattr(config, key, None):
            raise UnsupportedModel(refuse.format(f"it uses {feature}"))
    text = config.get_text_config(decoder=True)
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, ValueError):
        types, kwargs = [], []
    other = sorted(set(types) - {FULL, SLIDING})
    if other:
        raise UnsupportedModel(refuse.format(f"it has {', '.join(other)} layers"))
    if kind not in SUPPORTED:
        raise UnsupportedModel(refuse.format("its attention has not been verified against transformers"))
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(refuse.format("it uses bidirectional attention"))
    windows = tuple(int(kw["sliding_window"]) if t == SLIDING else None for t, kw in zip(types, kwargs, strict=True))
    if len(windows) != text.num_hidden_layers:
        raise UnsupportedModel(refuse.format(f"{len(windows)} layer types for {text.num_hidden_layers} layers"))
    return Layout(SUPPORTED[kind][0], windows)
