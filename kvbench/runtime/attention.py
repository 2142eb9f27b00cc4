"""The `kvbench` attention function, registered through transformers' AttentionInterface.

It computes the layer output with flash-attn on CUDA (when installed) or PyTorch SDPA, then, if the
layer runs under a step driver (kvbench/runtime/step.py), recomputes softmax(q_w K^T / sqrt(d)) for only
the last w query rows the policy asked for (O(w * n * d), never the n x n matrix) and hands them to the
driver, which runs the policy for this layer. In an SDPA decode step (one query) of a policy that reads
attention, the output is computed from those same probabilities (one pass over the keys instead of two). The model
code is not touched: this is selected with `attn_implementation="kvbench"`.

No mask function is registered for this name, so transformers passes `attention_mask=None` and the
causal structure is built here, bottom-right aligned: after evictions every layer may hold a
different number of tokens, and new tokens are always the last `q` rows of the cache. A sliding-window
layer (the `sliding_window` keyword its model passes) masks by true positions, as transformers' sliding
mask does by index; Gemma 2's logit soft-capping (`softcap`) is computed as transformers' eager
attention computes it (no SDPA kernel caps logits). Keywords that change attention in ways this function
does not reproduce (attention sinks, position biases, non-causal attention) are refused, never ignored.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvbench.runtime.architectures import UnsupportedModel
from kvbench.runtime.few_rows import outside_few_row_linear
from kvbench.runtime.step import BatchStep, SequenceStep

ATTN_IMPLEMENTATION = "kvbench"
STEP_KWARG = "kvbench_step"
"""The forward keyword that carries the step driver (`SequenceStep` or `BatchStep`) to every layer's attention."""


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


def _heads(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """A [B, K|1, q, n] mask for [B, H, q, n] scores (query heads of one KV head are adjacent)."""
    return mask if mask.shape[1] == 1 else mask.repeat_interleave(heads // mask.shape[1], dim=1)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA output [B, q, H, d]; `mask` ([B, K|1, q, n], True = visible) replaces the bottom-right causal one."""
    b, h, q, d = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    if q == 1:
        # decode: the query heads sharing a KV head become rows of one matrix (no KV repeat)
        out = F.scaled_dot_product_attention(query.view(b, kv_heads, h // kv_heads, d), key, value, attn_mask=mask,
                                             scale=scaling)
        return out.reshape(b, h, 1, -1).transpose(1, 2)
    gqa = h != kv_heads
    if mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=_heads(mask, h), scale=scaling,
                                             enable_gqa=gqa)
    elif q == k:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        mask = _causal_mask(q, k, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
           softcap: float | None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional extra [flash]

    # flash-attn aligns the causal mask bottom-right when q < k, which is what a prefix cache needs
    return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling,
                           causal=True, softcap=softcap or 0.0)


def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: int, scaling: float,
                   mask: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention of the last `rows` queries over all keys: [B, K, G, w, n], float32. `mask`: the
    [B, K|1, q, n] visibility of every query of the step (else bottom-right causal); `softcap`: Gemma 2's
    cap * tanh(score / cap) on the scaled scores, as transformers' eager attention applies it."""
    b, h, q, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    w = min(rows, q)
    g = h // kv_heads
    qw = _float32(query if w == q else query[:, :, q - w :, :]).reshape(b, kv_heads, g * w, d)
    scores = torch.matmul(qw, _float32(key).mT).mul_(scaling).view(b, kv_heads, g, w, n)
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    if mask is not None:
        scores.masked_fill_(~mask[:, :, None, q - w :, :], float("-inf"))
    elif w > 1:
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
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    refused = [feature for name, feature in REFUSED_KWARGS.items() if kwargs.get(name) is not None]
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        refused.append("non-causal (bidirectional) attention")
    if refused:
        raise UnsupportedModel(f"kvbench cannot run this model's attention exactly: it uses {', '.join(refused)}")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    shape = Shape(scaling, sliding_window, softcap)
    step: SequenceStep | BatchStep | None = kwargs.get(STEP_KWARG)
    if isinstance(step, BatchStep):  # each sequence attends over its own cache
        outs = []
        with outside_few_row_linear():
            for b, seq in enumerate(step.sequences):
                layer = seq.cache.layers[module.layer_idx]
                outs.append(_attend(module, query[b : b + 1], layer.keys, layer.values, shape, seq))
        return torch.cat(outs), None
    return _attend(module, query, key, value, shape, step), None


# keyword arguments some architectures pass that change the attention itself, and the feature each names
REFUSED_KWARGS = {"s_aux": "attention sinks (learned per-head logits, as gpt-oss)",
                  "position_bias": "an additive position bias"}


@dataclass(frozen=True)
class Shape:
    """What a layer's attention is, beyond causal softmax: its scale, sliding window and logit soft-cap."""

    scaling: float
    window: int | None = None
    softcap: float | None = None


def _visible(module: torch.nn.Module, q: int, n: int, window: int | None, step: SequenceStep | None,
             device: torch.device, reordered: bool = False) -> torch.Tensor | None:
    """[B, K|1, q, n] keys each new query may see, by true positions (rows are not in position order after
    evictions); None when bottom-right causal is exact: no window and the new tokens are the last rows (not so
    after an on-demand thaw appended rows: `reordered`), or every key inside the window of the last query (a
    decode step after the cache dropped what left the window)."""
    if window is None and not (reordered and q > 1):
        return None
    if step is None:
        keys, queries = torch.arange(n, device=device)[None, None], torch.arange(n - q, n, device=device)[None]
    else:
        layer = step.cache.layers[module.layer_idx]
        if window is not None and layer.window != window:
            raise UnsupportedModel(f"layer {module.layer_idx} attends with sliding window {window} but the model's "
                                   f"config gives it {layer.window}: kvbench cannot reproduce this layout")
        keys = layer.positions[:, :1] if layer.heads_aligned else layer.positions
        queries = step.cache.pending_positions.to(device)
    if window is not None and int(keys.min()) > int(queries.max()) - window:
        return None
    return _by_position(keys, queries, window)


def _by_position(keys: torch.Tensor, queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, K|1, q, n]: key positions ([B, K|1, n]) each query position ([B, q]) sees, causally and in its window."""
    k, q_ = keys[:, :, None, :], queries[:, None, :, None]
    visible = k <= q_
    return visible if window is None else visible & (k > q_ - window)


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shape: Shape,
            step: SequenceStep | None) -> torch.Tensor:
    """One sequence's attention output, then its policy step for this layer (with the rows it asked for)."""
    q = query.shape[2]
    rows = step.attn_rows if step is not None else 0
    reordered = False
    if step is not None and step.reads_queries:
        def score(frozen_keys: torch.Tensor, frozen_positions: torch.Tensor) -> torch.Tensor:
            return frozen_attention(query, key, frozen_keys, frozen_positions, shape, step, module.layer_idx)

        reordered = step.before_attention(module.layer_idx, score)
        if reordered:
            layer = step.cache.layers[module.layer_idx]
            key, value = layer.keys, layer.values
    mask = _visible(module, q, key.shape[2], shape.window, step, query.device, reordered)
    backend = backend_for(query.device, query.dtype)
    if shape.softcap is not None and (backend != "flash-attn" or mask is not None):
        # no fused SDPA kernel soft-caps logits: every query's probabilities, as eager attention computes them
        probs = attention_rows(query, key, q, shape.scaling, mask, shape.softcap)
        out = _weighted_values(probs, value, query.dtype)
        attn = probs[:, :, :, q - min(rows, q) :] if rows else None
    elif rows and q == 1 and backend == "sdpa":
        # decode step of a policy that reads attention: the output from the same probabilities, so the
        # keys are read once instead of once by SDPA and once more for the rows
        attn = attention_rows(query, key, 1, shape.scaling, mask)
        out = _weighted_values(attn, value, query.dtype)
    else:
        if backend == "flash-attn" and mask is None:
            out = _flash(query, key, value, shape.scaling, shape.softcap)
        else:
            out = _sdpa(query, key, value, shape.scaling, mask)
        attn = attention_rows(query, key, rows, shape.scaling, mask, shape.softcap) if rows else None
    if step is not None:
        step.after_attention(module.layer_idx, attn)
    return out


def frozen_attention(query: torch.Tensor, key: torch.Tensor, frozen_keys: torch.Tensor, frozen_positions: torch.Tensor,
                     shape: Shape, step: SequenceStep, layer_idx: int) -> torch.Tensor:
    """[B, K, G, q, m]: what each of this step's queries would give each frozen token were it active, i.e. one
    softmax over frozen and active keys with the layer's scale, soft-cap and window (frozen tokens are older than
    every new query, so causality never hides them)."""
    m = frozen_keys.shape[2]
    mask = None
    if shape.window is not None:
        layer = step.cache.layers[layer_idx]
        active = layer.positions[:, :1] if layer.heads_aligned else layer.positions
        keys = torch.cat([frozen_positions[:, :1].expand(active.shape[0], active.shape[1], -1), active], dim=-1)
        mask = _by_position(keys, step.cache.pending_positions.to(keys.device), shape.window)
    probs = attention_rows(query, torch.cat([frozen_keys.to(key.dtype), key], dim=2), query.shape[2], shape.scaling,
                           mask, shape.softcap)
    return probs[..., :m]


def _float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, without a dispatched no-op cast when it is already (every layer, every step counts)."""
    return t if t.dtype == torch.float32 else t.float()


def _weighted_values(attn: torch.Tensor, value: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention output in `dtype` from probabilities [B, K, G, q, n]: [B, q, H, d]. With query groups (G > 1), a
    batched product per KV head whose G query heads read its values through a stride-0 view: `matmul` broadcasting the
    values over the group axis copies them G times at every step (most of a decode step's attention at thousands of
    tokens), and one [G * q, n] product per KV head, though faster still, rounds differently. tests/test_attention.py
    holds this bit-equal to the broadcast product the record's cells were computed with."""
    b, kv_heads, g, q, n = attn.shape
    values = _float32(value)
    if g == 1:  # nothing to broadcast: one product for every head
        out = torch.matmul(attn, values.unsqueeze(2))
    else:
        out = torch.stack([torch.bmm(attn[i, k], values[i, k].expand(g, n, -1)) for i in range(b)
                           for k in range(kv_heads)]).view(b, kv_heads, g, q, -1)
    # one query: [B, K, G, 1, d] is already [B, 1, H, d] in memory
    out = out.view(b, 1, kv_heads * g, -1) if q == 1 else out.permute(0, 3, 1, 2, 4).reshape(b, q, kv_heads * g, -1)
    return out if out.dtype == dtype else out.to(dtype)


AttentionInterface.register(ATTN_IMPLEMENTATION, kvbench_attention)
