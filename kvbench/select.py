"""Token-selection helpers shared by the methods: masks over a layer's active tokens, per row.

All take and return [B, K, n] tensors (or anything broadcastable), so a method written with them
works unchanged for per-layer and per-head decisions. Ranking uses true positions, never the
physical order in the cache, which thaws and re-appends can change.
"""

from __future__ import annotations

import torch


def position_rank(positions: torch.Tensor) -> torch.Tensor:
    """0 for the oldest token of each row, n - 1 for the newest."""
    return positions.argsort(dim=-1).argsort(dim=-1)


def oldest(positions: torch.Tensor, k: int) -> torch.Tensor:
    """The k earliest tokens of each row (attention sinks)."""
    return position_rank(positions) < k


def newest(positions: torch.Tensor, k: int) -> torch.Tensor:
    """The k most recent tokens of each row (the local window)."""
    return position_rank(positions) >= positions.shape[-1] - k


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The k highest-scoring tokens of each row, chosen among those not in `exclude`."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if exclude is not None:
        scores = scores.masked_fill(exclude.expand(scores.shape), float("-inf"))
    return mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)


def per_kv_head(attn: torch.Tensor) -> torch.Tensor:
    """[B, K, G, w, n] attention rows -> [B, K, n]: summed over the queries and a KV head's query heads."""
    return attn.sum(dim=(2, 3))
