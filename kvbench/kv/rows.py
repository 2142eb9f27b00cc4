"""Rows: one layer's token rows on one device, in buffers with spare capacity.

K and V are [B, K, cap, d]; `meta` [B, K, cap, 3 + S] (float32) packs each token's true position
(column 0, exact below 2**24), the position its key is currently rotated at (column 1: the same
unless keys were re-rotated), its slot in the layer's frozen store (column 2, -1 while it has no
copy there; kvbench/kv/store.py) and the policy's S per-token state values, so moving a token is three
row copies whatever the policy keeps. The first `n` rows are valid. Appending writes in place (the
buffer grows by a quarter when full), and removing rows moves the last valid rows into the holes,
so a decode step, a freeze or a thaw costs O(rows moved) instead of rewriting the whole cache. Row
order is therefore not position order: policies rank tokens by their stored positions. `shrink`
reallocates a mostly empty buffer smaller (when: `PolicyLayer.compact`), so evicted bytes go back to
the allocator.
"""

from __future__ import annotations

import torch

from kvbench.kv.quant import KeyGroups, RowCodec

RowData = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # K, V, meta


POS, ROT, SLOT, STATE = 0, 1, 2, 3  # meta columns


def new_meta(positions: torch.Tensor, rotated_at: torch.Tensor, state_count: int) -> torch.Tensor:
    """Meta rows for fresh tokens: true positions and rotation positions [B, K, q], zeroed policy state."""
    meta = positions.new_zeros((*positions.shape, STATE + state_count), dtype=torch.float32)
    meta[..., POS] = positions
    meta[..., ROT] = rotated_at
    meta[..., SLOT] = -1
    return meta


def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (1-D) of a [B, K, cap, c] buffer as [B, K, k, c]. Gathering from the [B*K, cap, c] view is
    several times faster than `index_select` along axis 2 of the 4-D tensor (measured on CPU)."""
    b, h = t.shape[:2]
    return t.flatten(0, 1).index_select(1, idx).view(b, h, idx.numel(), t.shape[-1])


def row_bytes(k: torch.Tensor | None, v: torch.Tensor | None) -> int:
    """K/V bytes of one token row across batch and heads of [B, K, cap, d] buffers (0 before any data)."""
    if k is None:
        return 0
    b, h, _, d = k.shape
    return b * h * (d + v.shape[-1]) * k.element_size()


def full_index(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Expand a [B, K, k] row index to gather from a [B, K, n, c] tensor."""
    idx = idx.expand(rows.shape[0], rows.shape[1], idx.shape[-1])
    return idx.unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1])


FEW_ROWS = 8  # removals up to this many rows per head run on CPU from host lists (`Rows.remove_few`)
COPIED_MOVES = 2  # up to this many row moves as plain copies (~3 us a buffer each); more as one indexed copy (~7 us)


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """Indices worked out on the host, on `device`; to a GPU through pinned memory without waiting (a copy from
    pageable memory would hold the host until the device had caught up)."""
    host = torch.tensor(values, dtype=torch.long)
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def _moves(drop: list[int], n: int) -> list[tuple[int, int]]:
    """(hole, row) pairs that fill the holes among the first n - len(drop) rows with the valid rows beyond."""
    if len(drop) == 1:  # a decode step's eviction: the last row fills the hole
        return [] if drop[0] == n - 1 else [(drop[0], n - 1)]
    m, gone = n - len(drop), set(drop)
    return list(zip([i for i in drop if i < m], [j for j in range(m, n) if j not in gone], strict=True))


class TokenRows:
    """What active rows and a frozen store share: `n` tokens held in K/V buffers `k`, `v` ([B, K, cap, d]), in the
    model's dtype or, with codecs (kvbench/kv/quant.py), as quantized rows of bytes decoded to `dtype` on read."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    meta: torch.Tensor | None
    n: int
    key_codec: RowCodec | KeyGroups | None = None
    value_codec: RowCodec | None = None
    dtype: torch.dtype | None = None  # what a codec's rows decode to
    _row_bytes = 0  # fixed once the first buffers exist (batch, heads, head size and dtype never change)

    def _decoded(self, rows: torch.Tensor, codec: RowCodec | KeyGroups | None) -> torch.Tensor:
        return rows if codec is None else codec.decode(rows, self.dtype)

    def _written(self) -> int:
        """Rows whose buffers hold a token's data."""
        return self.n

    def rewrite_keys(self, first: int, rows: torch.Tensor) -> None:
        """Replace the stored key rows of the tokens at positions first .. first + q - 1 with `rows` [B, K, q, w]
        (KIVI's keys, quantized as they leave the full-precision window); a token held in no row is skipped."""
        n = self._written()
        if not n:
            return
        at = self.meta[:, :, :n, POS].long() - first
        hit = ((at >= 0) & (at < rows.shape[2]))[..., None]
        new = rows.gather(2, at.clamp(0, rows.shape[2] - 1)[..., None].expand(-1, -1, -1, rows.shape[-1]))
        self.k[:, :, :n] = torch.where(hit, new, self.k[:, :, :n])

    def key_groups(self) -> torch.Tensor:
        """KIVI: the group index of every written key row (`KeyGroups.index`)."""
        n = self._written()
        return KeyGroups.index(self.k[:, :, :n]) if n else torch.zeros(0, dtype=torch.int32)

    def renumber_key_groups(self, renumber: torch.Tensor) -> None:
        """KIVI: every written key row's group index mapped through `renumber` (`KeyGroups.compact`)."""
        n = self._written()
        if n:
            index = KeyGroups.index(self.k[:, :, :n])
            moved = torch.where(index >= 0, renumber[index.long().clamp(min=0)], index)
            self.k[:, :, :n, -4:] = moved[..., None].contiguous().view(torch.uint8)

    def requantize(self, below: int) -> None:
        """Quantize again, from their decoded values, the rows of the tokens at positions below `below` (transformers'
        quanto cache quantizes its whole cache again from dequantized values when its residual block flushes)."""
        n = self._written()
        if not n:
            return
        old = (self.meta[:, :, :n, POS].long() < below)[..., None]
        for buf, codec in ((self.k, self.key_codec), (self.v, self.value_codec)):
            rows = buf[:, :, :n]
            buf[:, :, :n] = torch.where(old, codec.encode(codec.decode(rows, self.dtype)), rows)

    def row_bytes(self) -> int:
        if not self._row_bytes:
            self._row_bytes = row_bytes(self.k, self.v)
        return self._row_bytes

    @property
    def nbytes(self) -> int:
        """K/V bytes of the `n` tokens held (active rows: the valid ones; a store: the frozen ones)."""
        return self.n * self.row_bytes()


class Rows(TokenRows):
    def __init__(self, state_names: tuple[str, ...], device: torch.device) -> None:
        self.state_names = state_names
        self.device = device
        self.n = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.meta: torch.Tensor | None = None

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def reserved_bytes(self) -> int:
        """K/V bytes the buffers occupy, spare capacity included."""
        return self.cap * self.row_bytes()

    # -- views of the valid rows -------------------------------------------------------------------
    def keys(self) -> torch.Tensor:
        return self._decoded(self.k[:, :, : self.n], self.key_codec)

    def values(self) -> torch.Tensor:
        return self._decoded(self.v[:, :, : self.n], self.value_codec)

    def positions(self) -> torch.Tensor:
        return self.meta[:, :, : self.n, POS].long()

    def rotations(self) -> torch.Tensor:
        """Positions the valid keys are currently rotated at."""
        return self.meta[:, :, : self.n, ROT].long()

    def state_view(self) -> dict[str, torch.Tensor]:
        """Per-token policy state as [B, K, n] views: in-place edits land in the buffer."""
        return self.positions_and_state()[1]

    def positions_and_state(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`positions()` and the per-token policy state as [B, K, n] views (in-place edits land in the buffer), from
        one slice of the meta rows: a policy's view is built at every layer and step, where each op counts."""
        columns = self.meta[:, :, : self.n].unbind(-1)
        return columns[POS].long(), {name: columns[STATE + i] for i, name in enumerate(self.state_names)}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write a policy's replaced per-token state (each [B, K, n] or broadcastable) back in place."""
        columns = self.meta[:, :, : self.n].unbind(-1)
        for i, name in enumerate(self.state_names):
            if name in state:
                columns[STATE + i].copy_(state[name])

    def _buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.meta]

    # -- growth and release -------------------------------------------------------------------------
    def _resize(self, cap: int, like: RowData) -> None:
        new = [torch.empty((*t.shape[:2], cap, t.shape[-1]), dtype=t.dtype, device=self.device) for t in like]
        if self.k is not None and self.n:
            for dst, src in zip(new, self._buffers(), strict=True):
                dst[:, :, : self.n] = src[:, :, : self.n]
        self.k, self.v, self.meta = new

    def shrink(self, rows: int) -> None:
        """Reallocate the buffers for `rows` (>= n) valid rows plus a quarter, giving the rest back to the allocator."""
        self._resize(max(rows, self.n) + rows // 4 + 16, (self.k, self.v, self.meta))

    # -- row operations -------------------------------------------------------------------------
    def append(self, data: RowData) -> None:
        q = data[0].shape[2]
        if self.n + q > self.cap:
            self._resize(max(self.n + q, self.cap + self.cap // 4 + 16), data)
        end = self.n + q
        for buf, rows in zip(self._buffers(), data, strict=True):
            buf[:, :, self.n : end] = rows
        self.n = end

    def swap(self, idx: torch.Tensor, data: RowData | None) -> None:
        """Drop rows `idx` and add `data`: incoming rows fill the holes first, so a freeze plus a thaw
        in one step costs a few row copies."""
        q = 0 if data is None else data[0].shape[2]
        fill = min(q, idx.shape[-1]) if idx.dim() == 1 else 0
        if fill:
            for buf, rows in zip(self._buffers(), data, strict=True):
                buf.index_copy_(2, idx[:fill], rows[:, :, :fill].to(buf.device))
        self.remove(idx[fill:] if fill else idx)
        if q > fill:
            self.append(tuple(rows[:, :, fill:] for rows in data))

    def remove(self, idx: torch.Tensor) -> None:
        """Drop rows `idx` (1-D, ascending: moves the last rows into the holes; else [B, K, k])."""
        k = idx.shape[-1]
        if k == 0:
            return
        if k <= FEW_ROWS and idx.device.type == "cpu":
            per_head = idx if idx.dim() == 1 else idx.expand(*self.k.shape[:2], -1).flatten(0, 1)
            self.remove_few([per_head.tolist()] if idx.dim() == 1 else per_head.tolist())
            return
        n, m = self.n, self.n - k
        if idx.dim() == 1:
            hole = torch.zeros(n, dtype=torch.bool, device=idx.device)
            hole[idx] = True
            dst = idx[idx < m]
            src = (~hole[m:]).nonzero().squeeze(-1) + m
            if dst.numel():
                for t in self._buffers():
                    t.index_copy_(2, dst, gather(t, src))
        else:
            self._remove_per_row(idx)
        self.n = m

    def remove_few(self, rows: list[list[int]]) -> None:
        """`remove` of rows listed on the host (a decode step's eviction) as one ascending list for every head or one
        per (sequence, head): the moves are worked out on the host, where the general path takes a dozen vectorised
        index ops per layer and step (~10 us of fixed overhead each on CPU). One or two moves run as plain row
        copies, more as one indexed copy per buffer; rows that differ per head move in one indexed copy per buffer
        for all heads. Nothing here reads the device, so on a GPU the host does not wait for it."""
        if len(rows) == 1:
            moves = _moves(rows[0], self.n)
            if len(moves) <= COPIED_MOVES:
                for hole, row in moves:
                    for t in self._buffers():
                        t.select(2, hole).copy_(t.select(2, row))
            else:
                hole, row = _on_device(moves, self.device).unbind(1)
                for t in self._buffers():
                    t.index_copy_(2, hole, t.index_select(2, row))
        else:
            heads = self.k.shape[1]
            moves = [(i // heads, i % heads, hole, row) for i, per_head in enumerate(rows)
                     for hole, row in _moves(per_head, self.n)]
            if moves:
                b, h, hole, row = _on_device(moves, self.device).unbind(1)
                for t in self._buffers():
                    t[b, h, hole] = t[b, h, row]
        self.n -= len(rows[0])

    def _remove_per_row(self, idx: torch.Tensor) -> None:
        """`remove` for a [B, K, k] index (k rows per head, different rows in each): as in the 1-D case, each
        head moves its valid rows from beyond the new end into its holes below it, so evicting one token per
        head per decode step (H2O) moves one row per head instead of rewriting the cache. Heads needing fewer
        moves than the most pad with a dropped row copied onto itself (discarded with the tail anyway)."""
        n, m = self.n, self.n - idx.shape[-1]
        hole = torch.zeros(idx.shape[0], idx.shape[1], n, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
        below = hole[..., :m]
        count = below.sum(-1, keepdim=True)  # per head: holes below m = valid rows at or beyond m
        c = int(count.max())
        if c == 0:
            return
        dst = torch.argsort((~below).to(torch.int8), dim=-1, stable=True)[..., :c]  # holes below m first
        src = torch.argsort(hole[..., m:].to(torch.int8), dim=-1, stable=True)[..., :c] + m  # valid rows first
        pad = torch.arange(c, device=idx.device) >= count
        if bool(pad.any()):
            spare = hole[..., m:].to(torch.int8).argmax(-1, keepdim=True) + m  # a dropped row beyond m
            dst, src = torch.where(pad, spare, dst), torch.where(pad, spare, src)
        for t in self._buffers():
            t.scatter_(2, full_index(dst, t), t.gather(2, full_index(src, t)))
