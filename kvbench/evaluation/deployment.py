"""What a row's measured bytes buy in a deployment: the model's KV bytes per token from its shape, the longest context
and the largest batch that fit a KV memory cap, the decode speed-up the bytes allow, and when compression repays its
prefill on a reused context."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvbench.runtime import architectures

GIB = 1024**3
KV_CAP = GIB
"""The KV memory cap the deployment columns fit contexts and batches in (the models here are small)."""
BATCH_CONTEXT = 4096
"""The context length of every sequence in the largest-batch column."""


@dataclass(frozen=True)
class ModelShape:
    """What one token's keys and values take in each layer, and the weights' bytes, of a model as loaded."""

    kv_heads: int
    head_dim: int
    windows: list[int | None]  # per layer: its sliding window, None for full attention
    dtype_bytes: int
    weight_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        heads = config.num_attention_heads
        return cls(kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   windows=list(architectures.layout(config).windows), dtype_bytes=model.dtype.itemsize,
                   weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))

    @property
    def layer_token_bytes(self) -> int:
        """One token in one layer: 2 (K and V) · KV heads · head dim · bytes."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes(self, tokens: int) -> int:
        """A full cache after `tokens`: every token in a full-attention layer, a sliding layer's last w − 1 (what
        transformers' cache holds between steps)."""
        return self.layer_token_bytes * sum(tokens if w is None else min(tokens, w - 1) for w in self.windows)

    def per_layer_type(self) -> str:
        """Bytes per token by layer type, e.g. `46,080` or `full 3 × 256 = 768 · sliding (w=512) 15 × 256 = 3,840`."""
        kinds: dict[int | None, int] = {}
        for w in self.windows:
            kinds[w] = kinds.get(w, 0) + 1
        if list(kinds) == [None]:
            return f"{self.layer_token_bytes * kinds[None]:,}"
        return " · ".join(f"{'full' if w is None else f'sliding (w={w})'} {n} × {self.layer_token_bytes:,} = "
                          f"{n * self.layer_token_bytes:,}" for w, n in kinds.items())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def longest_context(shape: ModelShape, kept: float, cap: int = KV_CAP) -> int | None:
    """The most tokens whose full cache, times the fraction `kept`, fits `cap`; None when any length fits (a cache
    of sliding layers only, or nothing kept)."""
    if kept <= 0 or all(w is not None for w in shape.windows):
        return None
    high = 1
    while kept * shape.kv_bytes(high) <= cap:  # a length that does not fit
        high *= 2
    return bisect.bisect_right(range(high), False, key=lambda n: kept * shape.kv_bytes(n) > cap) - 1


def largest_batch(shape: ModelShape, kept: float, context: int = BATCH_CONTEXT, cap: int = KV_CAP) -> int | None:
    """The most sequences of `context` tokens whose caches, each the fraction `kept` of full, fit `cap` together."""
    return None if kept <= 0 else int(cap // (kept * shape.kv_bytes(context)))


def bytes_speedup(weight_bytes: float, kv_bytes: float, compression: float) -> float:
    """Decode at batch 1 reads the weights and the cache each step: (W + KV) / (W + (1 − r) · KV), the speed-up a
    step bound by memory traffic gets from compression r."""
    return (weight_bytes + kv_bytes) / (weight_bytes + (1 - compression) * kv_bytes)


def break_even(context_ms: float, question_ms: float, full_context_ms: float, full_question_ms: float
               ) -> float | None:
    """Questions on one context after which a method's time (its context's prefill and compression, then each
    question) is at most full's: 0 when it never costs more, None when it never catches up."""
    extra, saved = context_ms - full_context_ms, full_question_ms - question_ms
    if extra <= 0 and saved >= 0:
        return 0.0
    if saved <= 0:
        return None
    return max(0.0, extra / saved)
