"""PolicyLayer: one decoder layer's tokens, active on the compute device or frozen in host memory, and the
data movement that applies a policy's decision to them (kvbench/kv/cache.py holds the layers).

`Rows` (kvbench/kv/rows.py) holds the active data: evicted rows are overwritten and sparse buffers are reallocated
smaller, so dropped bytes are really released. `FrozenStore` (kvbench/kv/store.py) holds host copies, written once
per token; a thaw copies a token back bit for bit, with its true position and its per-token policy state.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from kvbench.kv.accounting import Ledger
from kvbench.kv.positions import PositionMode
from kvbench.kv.quant import Block, KeyGroups, QuantoCodec, Recent, RowCodec
from kvbench.kv.rows import POS, RowData, Rows, gather
from kvbench.kv.store import FrozenStore
from kvbench.policy import Decision, LayerView, Phase

RECENT_STEPS = 8  # steps over which an active buffer must stay mostly empty before it is shrunk (`compact`)


def _as3d(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dim() == 3 else mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))


FEW_ENTRIES = 256  # a mask with at most this many selected (row, token) entries is indexed on the host (`_index`)


def _index(mask: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Indices of the True entries along the last axis: 1-D when the same in every row (a per-head mask built
    from positions, as StreamingLLM's, usually is), else [B, K, k]. The mask is read once (`nonzero`); a decode
    step's few entries are then grouped by row on the host instead of by a further device pass per check."""
    mask = _as3d(mask)
    mask = mask.expand(*mask.shape[:2], shape[2])
    if mask.shape[0] * mask.shape[1] == 1:
        return mask.nonzero()[:, 2]
    rows = _listed(mask, shape)
    return _index_rows(mask, shape) if rows is None else _rows_index(rows, shape, mask.device)


def _listed(mask: torch.Tensor, shape: tuple[int, int, int]) -> list[list[int]] | None:
    """The True entries of a [B|1, K|1, n] mask with few of them, as one list of rows per (sequence, head) of
    `shape` (a broadcast mask's row serves all it covers), read from the device once (`nonzero`); None when there
    are more than FEW_ENTRIES (a prompt's eviction: `_index_rows` compares the rows on the device)."""
    b, h = mask.shape[:2]
    found = mask.nonzero()
    if found.shape[0] > FEW_ENTRIES:
        return None
    rows: list[list[int]] = [[] for _ in range(b * h)]
    for bi, hi, i in found.tolist():
        rows[bi * h + hi].append(i)
    return _broadcast(rows, b, h, shape)


def _broadcast(rows: list[list[int]], b: int, h: int, shape: tuple[int, int, int]) -> list[list[int]]:
    """Rows listed for a [b, h] decision as one list per (sequence, head) of `shape` (a row of size-1 axes serves all
    it covers); a single row stays one."""
    if b * h == 1:
        return rows
    return [rows[(bi if b > 1 else 0) * h + (hi if h > 1 else 0)] for bi in range(shape[0]) for hi in range(shape[1])]


def _aligned(rows: list[list[int]]) -> bool:
    """Whether every row selects the same tokens (else the same number of them, or the decision is refused)."""
    if all(row == rows[0] for row in rows):
        return True
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("a decision must select the same number of tokens in every head and sequence")
    return False


def _listed_indices(evict: list[list[list[int]]], shape: tuple[int, int, int]) -> list[list[int]]:
    """An `evict` decision's [B|1, K|1, e] row indices, read on the host (`tolist`), as one ascending list per
    (sequence, head) of `shape`."""
    b, h = len(evict), len(evict[0])
    rows = [sorted(row) for per_b in evict for row in per_b]
    if any(len(set(row)) != len(row) or (row and (row[0] < 0 or row[-1] >= shape[2])) for row in rows):
        raise ValueError(f"an evict decision must name distinct rows in 0..{shape[2] - 1} in every head")
    return _broadcast(rows, b, h, shape)


def _rows_index(rows: list[list[int]], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """`_index`'s answer for rows listed on the host: 1-D when every row holds the same, else [B, K, k]."""
    if _aligned(rows):
        return torch.tensor(rows[0], dtype=torch.long, device=device)
    return torch.tensor(rows, dtype=torch.long, device=device).view(shape[0], shape[1], -1)


def _index_rows(mask: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """`_index` of a mask with many entries (a prompt's eviction), compared row against row on the device."""
    if bool((mask == mask[:1, :1]).all()):
        return mask[0, 0].nonzero().squeeze(-1)
    full = mask.expand(shape)
    counts = full.sum(-1)
    k = int(counts.flatten()[0])
    if not bool((counts == k).all()):
        raise ValueError("a decision must select the same number of tokens in every head and sequence")
    return full.nonzero()[:, 2].view(shape[0], shape[1], k)  # row-major: each row's indices, ascending


@dataclass(frozen=True)
class LayerHandle:
    """All a layer takes from its cache, fixed when the cache is built: the layer never reaches back into it (what
    changes per step, the step and its phase, comes with each `view` call)."""

    ledger: Ledger  # what the layer's changes are reported to
    token_state: tuple[str, ...]  # the policy's per-token state fields
    pin_memory: bool  # frozen rows in pinned host memory (CUDA)
    rollback_reserve: int  # positions a sliding layer keeps beyond its window for a rollback
    position_mode: PositionMode
    num_layers: int
    new_meta: Callable[[tuple[int, int, int], torch.device], torch.Tensor]  # this step's new rows' meta
    codec: RowCodec | None = None  # K/V stored quantized (kvbench/kv/quant.py), active and frozen alike


class PolicyLayer(CacheLayerMixin):
    """One layer: active rows on the compute device, frozen rows in host memory. `update` only appends;
    the policy runs after attention (`SequenceStep.after_attention`) and its decision is applied here (`apply`).
    A sliding layer (`window` w) drops the tokens no later query can see, keeping the last w - 1
    positions as transformers' `DynamicSlidingWindowLayer` does (`expire`)."""

    def __init__(self, handle: LayerHandle, layer_idx: int, window: int | None = None) -> None:
        super().__init__()
        self.handle = handle
        self.ledger = handle.ledger
        self.layer_idx = layer_idx
        self.window = window
        self.is_sliding = window is not None
        self.expired = 0
        self.expired_below = 0  # positions below this may have left the window (gone, not evicted)
        self.active = Rows(handle.token_state, torch.device("cpu"))
        self.frozen = FrozenStore(handle.token_state, pin=handle.pin_memory)
        self.codec: RowCodec | None = None  # handle.codec sized to this layer's heads, at the first update
        self.key_codec: RowCodec | KeyGroups | None = None  # the codec, or KIVI's per-channel key groups
        self.recent: Recent | None = None  # the newest tokens in full precision (a codec with a residual)
        self.block: Block | None = None  # transformers' quanto residual: the tokens since its last flush
        self.plain_row_bytes = 0  # one token's K/V in the model's dtype (what transformers' own cache stores)
        self._handed: dict[str, torch.Tensor] = {}  # the active state views handed to the policy
        self.seen = 0
        self.evicted = 0
        self.new_tokens = 0
        self.heads_aligned = True  # every head holds the same token at each row (no per-head eviction yet)
        self._recent: deque[int] = deque(maxlen=RECENT_STEPS)  # active rows at the end of recent steps

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.active.device = self.device
        self.active.dtype = self.frozen.dtype = self.dtype
        b, h, _, d = key_states.shape
        if self.handle.codec is not None:
            self.codec = self.handle.codec.sized(d, value_states.shape[-1])
            self.key_codec = KeyGroups(self.codec.bits) if self.codec.keys_per_channel else self.codec
            for rows in (self.active, self.frozen):
                rows.key_codec, rows.value_codec = self.key_codec, self.codec
            self.recent = Recent(self.codec.residual) if self.codec.residual else None
            self.block = Block(self.codec.block) if isinstance(self.codec, QuantoCodec) else None
        self.plain_row_bytes = b * h * (d + value_states.shape[-1]) * key_states.element_size()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        meta = self.handle.new_meta((b, h, q), self.device)
        self.seen += q
        self.new_tokens = q
        if self.codec is None:  # the model's dtype: the decode step's path, nothing added, the bytes counted directly
            rows = self.active
            cap = rows.cap
            rows.append((key_states, value_states, meta))
            self.keys, self.values = rows.keys(), rows.values()
            self.ledger.resized(q * rows.row_bytes(), 0, (rows.cap - cap) * rows.row_bytes())
            return self.keys, self.values
        before = self._sizes()
        flush = self._append_quantized(key_states, value_states, meta)
        self._refresh(before)
        if flush:  # after the keys this step attends are read
            self._flush()
        return self.keys, self.values

    def _append_quantized(self, key_states: torch.Tensor, value_states: torch.Tensor, meta: torch.Tensor) -> bool:
        """New rows stored quantized; KIVI's keys leaving the window quantized; the window's (or block's) copies
        updated. Whether the block flushes after this step."""
        self.active.append((self.key_codec.encode(key_states), self.codec.encode(value_states), meta))
        positions = meta[0, 0, :, POS].long()
        if isinstance(self.key_codec, KeyGroups):
            self._quantize_leaving(key_states, int(positions[0]), int(positions[-1]) + 1)
        if self.recent is not None:
            self.recent.add(key_states, value_states, positions)
        return self.block is not None and self.block.add(key_states, value_states)

    def _flush(self) -> None:
        """transformers' quanto flush: the rows quantized before the block quantized again from their values; the
        block's tokens are stored as quantized from full precision already."""
        before = self._sizes()
        self.active.requantize(self.block.since)
        self.frozen.requantize(self.block.since)
        self.block.flushed_at(self.seen)
        self._account(before)

    def _quantize_leaving(self, new_keys: torch.Tensor, first_new: int, end: int) -> None:
        """KIVI: quantize, a group of consecutive positions at a time, the keys of the tokens that leave the
        full-precision window as positions up to `end` arrive (read from the window, or from the new tokens'
        `new_keys`, which start at `first_new`), and write them into every row holding those tokens."""
        groups, window = self.key_codec, self.recent
        while groups.upto < end - window.size:
            at = torch.arange(groups.upto, groups.upto + groups.group, device=self.device)
            new = (at >= first_new)[None, None, :, None]
            fresh = new_keys[:, :, (at - first_new).clamp(0, new_keys.shape[2] - 1)]
            old = fresh if window.k is None else window.k[:, :, at % window.size]
            rows = groups.quantize(torch.where(new, fresh, old))
            self.active.rewrite_keys(groups.upto, rows)
            self.frozen.rewrite_keys(groups.upto, rows)
            groups.upto += groups.group

    def _sizes(self) -> tuple[int, int, int]:
        if self.codec is None:
            return self.active.nbytes, self.frozen.nbytes, self.active.reserved_bytes
        recent = 0 if self.recent is None else self.recent.nbytes  # full-precision copies of the newest tokens
        recent += 0 if self.block is None else self.block.nbytes
        if isinstance(self.key_codec, KeyGroups):
            recent += self.key_codec.nbytes  # KIVI's per-channel scales and minimums
        return self.active.nbytes + recent, self.frozen.nbytes, self.active.reserved_bytes + recent

    def _refresh(self, before: tuple[int, int, int]) -> None:
        self.keys, self.values = self.active.keys(), self.active.values()
        if self.recent is not None and self.active.n:
            self.keys, self.values = self.recent.overlay(self.keys, self.values, self.active.positions())
        if self.block is not None and self.active.n:
            self.keys, self.values = self.block.overlay(self.keys, self.values, self.active.positions())
        self._account(before)

    def _account(self, before: tuple[int, int, int]) -> None:
        """The ledger told how the layer's active, frozen and reserved bytes moved since `before`."""
        active, frozen, reserved = self._sizes()
        self.ledger.resized(active - before[0], frozen - before[1], reserved - before[2])

    @property
    def positions(self) -> torch.Tensor:
        return self.active.positions()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.active.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.active.n

    def full_tokens(self) -> int:
        """Tokens transformers' own cache would hold in this layer now: all seen, or a window's last w - 1."""
        return self.seen if self.window is None else min(self.seen, self.window - 1)

    def expire(self, attn: torch.Tensor | None) -> torch.Tensor | None:
        """Drop active and frozen tokens that left the window (no later query can attend them again), and
        return `attn` with its columns following the rows that stay. When heads hold different tokens after
        per-head evictions, each head drops as many of its oldest as the head with fewest outside the window;
        the rest stay active (counted) and masked by the attention function until the policy drops them."""
        start = self.seen - self.window + 1 - self.handle.rollback_reserve  # the oldest a later query can see
        before = self._sizes()
        f, dropped = self.frozen, 0
        if f.n:
            gone = (f.positions()[0, 0] < start).nonzero().squeeze(-1)
            f.discard(gone)
            dropped = gone.numel()
        positions = self.active.positions()
        outside = positions < start
        count = int(outside.sum(-1).min()) if self.active.n else 0
        if count:
            if self.heads_aligned:
                idx = outside[0, 0].nonzero().squeeze(-1)
            else:
                idx = positions.topk(count, dim=-1, largest=False).indices.sort(-1).values
            self.active.remove(idx)
        if count + dropped:
            self.expired += count + dropped
            self.expired_below = start
        self._refresh(before)
        if attn is None or not count:
            return attn
        return _follow(attn, positions, self.active.positions())

    def get_max_length(self) -> int:
        return -1

    def drop_from(self, first: int) -> None:
        """Remove the tokens at positions >= `first`, active or frozen, as if never fed (`seen` shrinks with
        them). Those the policy had evicted are uncounted; earlier tokens it evicted stay evicted."""
        before = self._sizes()
        if isinstance(self.key_codec, KeyGroups):  # tokens fed again at these positions are new ones to quantize
            self.key_codec.upto = min(self.key_codec.upto, first)
        if self.block is not None:
            self.block.drop_from(first)
        f = self.frozen
        frozen = 0
        if f.n:
            gone = (f.positions()[0, 0] >= first).nonzero().squeeze(-1)
            f.discard(gone)
            frozen = gone.numel()
        active = 0
        if self.active.n:
            later = self.active.positions() >= first
            idx = _index(later, tuple(later.shape))
            self.active.remove(idx)
            active = idx.shape[-1]
        undone = max(0, self.seen - first)
        self.evicted -= undone - active - frozen
        self.seen -= undone
        self._refresh(before)

    def view(self, attn: torch.Tensor | None, step: int, phase: Phase) -> LayerView:
        f = self.frozen
        frozen_positions, frozen_state = f.view() if f.n else (None, {})
        positions, self._handed = self.active.positions_and_state()
        return LayerView(
            layer_idx=self.layer_idx,
            num_layers=self.handle.num_layers,
            window=self.window,
            full_tokens=self.full_tokens(),
            keys=self.keys,
            values=self.values,
            positions=positions,
            new_tokens=self.new_tokens,
            seen=self.seen,
            attn=attn,
            state=dict(self._handed),
            frozen_positions=frozen_positions,
            frozen_state=dict(frozen_state),
            step=step,
            phase=phase,
        )

    def store_state(self, view: LayerView) -> None:
        """Write back the per-token state the policy changed. Active state entries are views of the buffer
        (in-place edits are already there); frozen ones are gathered copies, so edited ones go back too."""
        replaced = {k: t for k, t in view.state.items() if t is not self._handed.get(k)}
        if replaced:
            self.active.set_state(replaced)
        if view.frozen_positions is not None:
            self.frozen.write_back(view.frozen_state)

    def compact(self, slack: int, settle: bool) -> None:
        """Return a mostly empty active buffer to the allocator: once over `slack` times the most rows it held at
        the end of this step or of any of the RECENT_STEPS - 1 before it is reserved (`settle`: the end of a
        prompt, judged on the rows held now). Judging on recent steps keeps a size that swings (ASR-KF-EGR's
        freeze and thaw cohorts: ~100 <-> ~600 rows every other step at 1k) from reallocating and copying the
        buffer twice a step."""
        if isinstance(self.key_codec, KeyGroups):
            self._drop_unused_key_groups()
        if settle:
            self._recent.clear()
        self._recent.append(self.active.n)
        high = max(self._recent)
        if self.active.cap - slack * high <= 64:
            return
        before = self._sizes()
        self.active.shrink(high)
        self._refresh(before)

    def _drop_unused_key_groups(self) -> None:
        """KIVI: the key groups no active row or frozen copy refers to leave the table, the rows' indices follow."""
        before = self._sizes()
        stores = (self.active, self.frozen)
        renumber = self.key_codec.compact(torch.cat([s.key_groups().flatten().to(self.device) for s in stores]))
        if renumber is not None:
            for s in stores:
                s.renumber_key_groups(renumber.to(s.k.device) if s.k is not None else renumber)
            self._account(before)

    # -- applying a decision ------------------------------------------------------------------
    def apply(self, d: Decision) -> None:
        if d.evict is not None:
            d = Decision(keep=self._keep_mask(_as3d(d.evict))) if self.codec is not None else d
        if d.freeze is None and d.thaw is None and self.codec is None:
            if d.evict is not None:
                self.evict_listed(_as3d(d.evict).tolist())
            elif d.keep is not None:
                self._evict(keep=_as3d(d.keep))
            return
        b, h, n = self.keys.shape[:3]
        shape = (b, h, n)
        before = self._sizes()
        keep = None if d.keep is None else _as3d(d.keep)
        freeze = None if d.freeze is None else _as3d(d.freeze)
        if keep is not None and freeze is not None and bool((keep & freeze).any()):
            raise ValueError(f"layer {self.layer_idx}: a token cannot be both kept and frozen")
        # validate both masks before anything moves, so a refused decision loses nothing
        freeze_idx = self._shared_index(freeze, n, "freeze") if freeze is not None else None
        thaw_idx = thawed = None
        if d.thaw is not None and self.frozen.n:
            thaw_idx = self._shared_index(d.thaw.cpu(), self.frozen.n, "thaw")
        if thaw_idx is not None and thaw_idx.numel():
            thawed = self._restore_rows(thaw_idx)
        frozen = 0 if freeze_idx is None else freeze_idx.numel()
        if frozen:
            self._offload_rows(freeze_idx)
        drop = None if keep is None else ~keep
        if drop is None and freeze_idx is not None:  # keep=None: the frozen rows leave, nothing is evicted
            drop_idx = freeze_idx
        elif drop is not None:
            drop_idx = _index(drop, shape)
        else:
            drop_idx = torch.empty(0, dtype=torch.long, device=self.device)
        self.active.swap(drop_idx, thawed)
        self.heads_aligned &= drop_idx.dim() == 1
        self.evicted += drop_idx.shape[-1] - frozen
        self.handle.position_mode.settle(self.active)
        self._refresh(before)

    def _shape(self) -> tuple[int, int, int]:
        """[B, K, n] of the active rows."""
        return self.active.k.shape[0], self.active.k.shape[1], self.active.n

    def _keep_mask(self, evict: torch.Tensor) -> torch.Tensor:
        """The keep mask of an `evict` decision, for the paths that take masks (quantized rows)."""
        b, h, n = self._shape()
        return torch.ones(b, h, n, dtype=torch.bool, device=evict.device).scatter_(
            -1, evict.expand(b, h, -1), False)

    def evict_listed(self, evict: list[list[list[int]]]) -> None:
        """`apply` of an `evict` decision already read on the host ([B|1, K|1, e] row indices, any order), on rows in
        the model's dtype."""
        self._evict(rows=_listed_indices(evict, self._shape()))

    def _evict(self, keep: torch.Tensor | None = None, rows: list[list[int]] | None = None) -> None:
        """`apply` of a decision that only evicts (a `keep` mask, or the evicted `rows` listed per (sequence, head)),
        on rows in the model's dtype: the decode step's case, with the bytes counted directly instead of measured
        before and after. Rows listed on the host (given so, or a CPU mask's at most FEW_ENTRIES) move from those
        lists (`Rows.remove_few`, which never reads the device); the rest as `apply` moves them."""
        active, shape = self.active, self._shape()
        drop = None
        if rows is None:
            drop = ~keep
            drop = drop.expand(*drop.shape[:2], shape[2])
            rows = _listed(drop, shape) if self.device.type == "cpu" else None
        if rows is not None:
            aligned = _aligned(rows)
            count = len(rows[0])
            if count:
                active.remove_few(rows[:1] if aligned else rows)
        else:
            idx = _index(drop, shape)
            aligned, count = idx.dim() == 1, idx.shape[-1]
            active.remove(idx)
        if not count:
            return
        self.heads_aligned &= aligned
        self.evicted += count
        self.handle.position_mode.settle(active)
        self.keys, self.values = active.keys(), active.values()
        self.ledger.resized(-count * active.row_bytes(), 0, 0)

    def _shared_index(self, mask: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """1-D indices of a freeze or thaw mask. The frozen store keeps one slot per token for all KV
        heads, so these masks must agree across heads, over rows that hold the same token in every head."""
        mask = _as3d(mask)
        if mask.shape[0] * mask.shape[1] > 1 and not bool((mask == mask[:1, :1]).all()):
            raise ValueError(f"layer {self.layer_idx}: {what} decisions must be the same for every KV head "
                             "(the frozen store keeps one copy per token); use a [n] or [B, 1, n] mask")
        idx = mask[0, 0].expand(n).nonzero().squeeze(-1)
        if what == "freeze" and idx.numel() and not self.heads_aligned:
            raise ValueError(f"layer {self.layer_idx}: cannot freeze after per-head evictions (the heads hold "
                             "different tokens at the same rows)")
        return idx

    def _offload_rows(self, idx: torch.Tensor) -> None:
        """Freeze active rows `idx`: host copies of those without one, the policy state of all of them."""
        t0 = time.perf_counter()
        rows = self.active
        meta = gather(rows.meta, idx).cpu()

        def fetch(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sel = idx[new.to(idx.device)]
            return gather(rows.k, sel), gather(rows.v, sel)

        copied = self.frozen.put(meta, fetch)
        self.ledger.froze(idx.numel(), copied, time.perf_counter() - t0)

    def _restore_rows(self, idx: torch.Tensor) -> RowData:
        """Device copies of frozen tokens `idx`, bound for the active rows."""
        t0 = time.perf_counter()
        k, v, meta = self.frozen.take(idx)
        dev = self.device
        rows = (k.to(dev, non_blocking=True), v.to(dev, non_blocking=True), meta.to(dev))
        self.ledger.thawed(meta.shape[2], k.nbytes + v.nbytes, time.perf_counter() - t0)
        return rows


def _follow(attn: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Attention columns [B, K, G, w, n] of rows with positions `before` ([B, K, n]), picked and reordered for
    the rows now holding positions `after` ([B, K, m]; a head holds each position at most once)."""
    order = before.argsort(-1)
    cols = order.gather(-1, torch.searchsorted(before.gather(-1, order), after))
    b, k, g, w, _ = attn.shape
    return attn.gather(-1, cols[:, :, None, None, :].expand(b, k, g, w, cols.shape[-1]))
