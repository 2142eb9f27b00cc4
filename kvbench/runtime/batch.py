"""Batched decoding over per-sequence caches: B sequences share each forward pass (the weights are read
once per step for all of them) while each keeps its own PolicyCache, its own length, its own evictions
and its own positions. Nothing is padded: the attention function attends each sequence over its own
rows (`kvbench_attention` sees `caches`), so no mask is needed and no pad token ever enters a cache.
Prompts are prefilled one sequence at a time (prefill is compute-bound; batching it buys little).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.kv.cache import PolicyCache


class _BatchLayer(CacheLayerMixin):
    """Hands each sequence its row of the step's new keys and values."""

    is_sliding = False

    def __init__(self, owner: BatchCache, layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        with outside_few_row_linear():
            for b, cache in enumerate(self.owner.caches):
                cache.layers[self.layer_idx].update(key_states[b : b + 1], value_states[b : b + 1])
        return key_states, value_states  # unused: the attention function reads each sequence's own rows

    def get_seq_length(self) -> int:
        return max(c.layers[self.layer_idx].get_seq_length() for c in self.owner.caches)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class FewRowLinear(TorchFunctionMode):
    """While active, `F.linear` on 2..16 rows on the CPU runs as W @ xᵀ: the same product, but MKL does
    [N, K] × [K, B] about 3× faster than F.linear's [B, K] × [K, N] for a handful of rows (measured on this
    2-core machine, 30 SmolLM2 layers at B = 4: 12.9 vs 38.2 ms), which is what a batched decode step is.
    A torch-function mode, so the model code is untouched; rounding differs from F.linear like any change
    of kernel (batch 1 already uses a different one, GEMV)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.shape[:-1].numel()
            if x.device.type == "cpu" and 1 < rows <= 16:
                out = (weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
                if bias is not None:
                    out += bias
                return out.view(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def outside_few_row_linear() -> torch.DisableTorchFunction:
    """For kvbench's own work inside a batched forward (cache appends, attention, policy steps): torch-function
    modes off, so FewRowLinear's Python hook, meant for the model's products, does not run on each of the ~200
    small ops per layer and sequence a policy like ASR-KF-EGR issues (its batch-4 step at 1k: 462 -> 334 ms)."""
    return torch.DisableTorchFunction()


class BatchCache(Cache):
    """The cache handed to the model for one batched decode step over `caches` (one per sequence)."""

    def __init__(self, caches: list[PolicyCache]) -> None:
        if not caches:
            raise ValueError("a batch needs at least one sequence")
        self.caches = list(caches)
        super().__init__(layers=[_BatchLayer(self, i) for i in range(len(caches[0].layers))])

    def begin_step(self, positions: torch.Tensor, rotations: torch.Tensor) -> None:
        """`positions` / `rotations`: [B, 1], each sequence's true position and the one it is rotated at."""
        for b, cache in enumerate(self.caches):
            cache.begin_step(positions[b : b + 1], prefill=False, last_chunk=True, rotation_ids=rotations[b : b + 1])

    def end_step(self) -> None:
        for cache in self.caches:
            cache.end_step()
