"""The `kvbench` attention function, registered through transformers' AttentionInterface.

It computes the layer output with flash-attn on CUDA (when installed) or PyTorch SDPA, then, if the
layer runs under a PolicyCache, recomputes softmax(q_w K^T / sqrt(d)) for only the last w query rows
the policy asked for (O(w * n * d), never the n x n matrix) and hands them to the cache, which runs
the policy for this layer. In an SDPA decode step (one query) of a policy that reads attention, the
output is computed from those same probabilities (one pass over the keys instead of two). The model
code is not touched: this is selected with `attn_implementation="kvbench"`.

No mask function is registered for this name, so transformers passes `attention_mask=None` and the
causal structure is built here, bottom-right aligned: after evictions every layer may hold a
different number of tokens, and new tokens are always the last `q` rows of the cache.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvbench.batch import outside_few_row_linear

ATTN_IMPLEMENTATION = "kvbench"
CACHE_KWARG = "kvbench_cache"


@cache
def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_available():
        return "flash-attn"
    return "sdpa"


def _causal_mask(q: int, k: int, device: torch.device) -> torch.Tensor:
    """[q, k] boolean mask where query i (the (k - q + i)-th token) sees keys 0 .. k - q + i."""
    return torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    b, h, q, d = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    if q == 1:
        # decode: the query heads sharing a KV head become rows of one matrix (no KV repeat)
        out = F.scaled_dot_product_attention(query.view(b, kv_heads, h // kv_heads, d), key, value, scale=scaling)
        return out.reshape(b, h, 1, -1).transpose(1, 2)
    gqa = h != kv_heads
    if q == k:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        mask = _causal_mask(q, k, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional extra [flash]

    # flash-attn aligns the causal mask bottom-right when q < k, which is what a prefix cache needs
    return flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=True
    )


def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: int, scaling: float) -> torch.Tensor:
    """Softmax attention of the last `rows` queries over all keys: [B, K, G, w, n], float32."""
    b, h, q, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    w = min(rows, q)
    g = h // kv_heads
    qw = query[:, :, q - w :, :].float().reshape(b, kv_heads, g * w, d)
    scores = torch.matmul(qw, key.float().transpose(-1, -2)).mul_(scaling).view(b, kv_heads, g, w, n)
    if w > 1:
        # row r is the (n - w + r)-th token: it sees keys 0 .. n - w + r
        visible = _causal_mask(w, n, query.device)
        scores.masked_fill_(~visible, float("-inf"))
    return scores.softmax(dim=-1)


def kvbench_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    policy_cache = kwargs.get(CACHE_KWARG)
    if hasattr(policy_cache, "caches"):  # a BatchCache: each sequence attends over its own cache
        outs = []
        with outside_few_row_linear():
            for b, cache in enumerate(policy_cache.caches):
                layer = cache.layers[module.layer_idx]
                outs.append(_attend(module, query[b : b + 1], layer.keys, layer.values, scaling, cache))
        return torch.cat(outs), None
    return _attend(module, query, key, value, scaling, policy_cache), None


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
            policy_cache) -> torch.Tensor:
    """One sequence's attention output, then its policy step for this layer (with the rows it asked for)."""
    rows = policy_cache.attn_rows if policy_cache is not None else 0
    backend = backend_for(query.device, query.dtype)
    if rows and query.shape[2] == 1 and backend == "sdpa":
        # decode step of a policy that reads attention: the output from the same probabilities, so the
        # keys are read once instead of once by SDPA and once more for the rows
        attn = attention_rows(query, key, 1, scaling)
        out = _weighted_values(attn, value).to(query.dtype)
    else:
        out = _flash(query, key, value, scaling) if backend == "flash-attn" else _sdpa(query, key, value, scaling)
        attn = attention_rows(query, key, rows, scaling) if rows else None
    if policy_cache is not None:
        policy_cache.after_attention(module.layer_idx, attn)
    return out


def _weighted_values(attn: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention output of one query per head from its probabilities [B, K, G, 1, n]: [B, 1, H, d]."""
    b, kv_heads, g, _, n = attn.shape
    out = torch.matmul(attn.view(b, kv_heads, g, n), value.float())  # [B, K, G, d]
    return out.reshape(b, 1, kv_heads * g, -1)


AttentionInterface.register(ATTN_IMPLEMENTATION, kvbench_attention)
