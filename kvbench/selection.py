"""Token-selection helpers shared by the methods: masks over a layer's active tokens, per row.

All take and return [B, K, n] tensors (or anything broadcastable, with any leading axes), so a method written with
them works unchanged for per-layer and per-head decisions, and for every layer at once (`policy.AcrossLayers`).
Windows are defined on true positions, never on the physical order of rows in the cache, which evictions, thaws and
re-appends change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sinks(positions: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens at the first k positions of the sequence (attention sinks)."""
    return positions < k


def recent(positions: torch.Tensor, seen: int, k: int) -> torch.Tensor:
    """Tokens among the k most recent positions (the local window), `seen` tokens into the sequence."""
    return positions >= seen - k


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The k highest-scoring tokens of each row, chosen among those not in `exclude`. When most tokens
    stay, the n - k lowest are found instead (topk is several times slower for k near n on CPU)."""
    n = scores.shape[-1]
    if exclude is not None:
        scores = scores.masked_fill(exclude.expand(scores.shape), float("-inf"))
    if 2 * k > n:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return mask.scatter_(-1, scores.topk(max(0, n - k), dim=-1, largest=False).indices, False)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, scores.topk(k, dim=-1).indices, True) if k > 0 else mask


def bottom_k(scores: torch.Tensor, e: int, exclude: torch.Tensor | None = None, excluded: int = 0
             ) -> torch.Tensor | None:
    """Indices [..., e] of the e lowest-scoring tokens of each row outside `exclude` (which must hold `excluded`
    tokens in every row): the tokens `top_k(scores, n - excluded - e, exclude)` leaves out, found without a mask.
    None where that set is not unique (a tie at its boundary, which top_k's own order settles) or `exclude` does not
    hold `excluded` tokens: the caller then selects with `top_k`, so the kept set never depends on which was used."""
    n = scores.shape[-1]
    if e >= n:
        return None
    if exclude is not None:
        scores = scores.masked_fill(exclude.expand(scores.shape), float("inf"))
    values, indices = scores.topk(e + 1, dim=-1, largest=False)
    unique = values[..., e - 1] < values[..., e]
    if exclude is not None:
        unique &= exclude.expand(scores.shape).sum(-1) == excluded
    return indices[..., :e] if bool(unique.all()) else None


def per_kv_head(attn: torch.Tensor) -> torch.Tensor:
    """[..., B, K, G, w, n] attention rows -> [..., B, K, n]: summed over the queries and a KV head's query heads."""
    return attn.sum(dim=(-3, -2))


def per_layer(attn: torch.Tensor) -> torch.Tensor:
    """[..., B, K, G, w, n] attention rows -> [..., B, 1, n]: mean over query heads, summed over the queries (a
    decode step's one query: nothing to sum)."""
    mean = attn.mean(dim=(-4, -3))
    return mean if mean.shape[-2] == 1 else mean.sum(dim=-2, keepdim=True)


def accumulate(view, name: str, contribution: torch.Tensor, decay: float = 1.0) -> torch.Tensor:
    """Running per-token score kept in the cache: score <- decay * score + contribution, in place (the state is a
    view of the cache's rows, so nothing is written back). A per-layer contribution ([..., 1, n]) updates every KV
    head's copy alike and its first head's scores are returned, in the contribution's shape."""
    old = view.state[name]
    if decay != 1.0:  # x * 1.0 is x: one op fewer
        old.mul_(decay)
    old.add_(contribution)
    return old if contribution.shape == old.shape else old[..., :1, :]



def pool(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """[B, K, n] scores pooled over each token's `kernel` neighbours along the last axis, zero-padded at the ends
    (SnapKV's smoothing). The axis must be in position order (`in_position_order`)."""
    b, k, n = scores.shape
    flat = scores.reshape(b * k, 1, n)
    if how == "max":
        return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(b, k, n)
    return F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(b, k, n)


def in_position_order(positions: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The permutation that sorts a layer's rows by position, and the function that puts a [B, K, n] mask computed
    in that order back in row order. After an eviction rows are not in position order (removal moves the last
    rows into the holes); a rule on neighbours, and its tie-breaks, must not depend on that."""
    order = positions.argsort(dim=-1)
    return order, lambda sorted_mask: torch.empty_like(sorted_mask).scatter_(-1, order, sorted_mask)
