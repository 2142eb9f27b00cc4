"""Rows: one layer's token rows on one device, in buffers with spare capacity.

K and V are [B, K, cap, d]; `meta` [B, K, cap, 2 + S] (float32) packs each token's true position
(column 0, exact below 2**24), the position its key is currently rotated at (column 1: the same
unless keys were re-rotated) and the policy's S per-token state values, so moving a token is three
row copies whatever the policy keeps. The first `n` rows are valid. Appending writes in place (the
buffer grows by a quarter when full), and removing rows moves the last valid rows into the holes,
so a decode step, a freeze or a thaw costs O(rows moved) instead of rewriting the whole cache. Row
order is therefore not position order: policies rank tokens by their stored positions. `compact`
reallocates a mostly empty buffer at its valid size, so evicted bytes go back to the allocator.
"""

from __future__ import annotations

import torch

RowData = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # K, V, meta


POS, ROT, STATE = 0, 1, 2  # meta columns


def new_meta(positions: torch.Tensor, rotated_at: torch.Tensor, state_count: int) -> torch.Tensor:
    """Meta rows for fresh tokens: true positions and rotation positions [B, K, q], zeroed policy state."""
    meta = positions.new_zeros((*positions.shape, STATE + state_count), dtype=torch.float32)
    meta[..., POS] = positions
    meta[..., ROT] = rotated_at
    return meta


def full_index(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Expand a [B, K, k] row index to gather from a [B, K, n, c] tensor."""
    idx = idx.expand(rows.shape[0], rows.shape[1], idx.shape[-1])
    return idx.unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1])


class Rows:
    def __init__(self, state_names: tuple[str, ...], device: torch.device, pin: bool = False) -> None:
        self.state_names = state_names
        self.device = device
        self.pin = pin  # host buffers in pinned memory (the frozen store of a CUDA run)
        self.n = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.meta: torch.Tensor | None = None
        self._copy_done: torch.cuda.Event | None = None

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def row_bytes(self) -> int:
        if self.k is None:
            return 0
        b, h, _, d = self.k.shape
        return b * h * (d + self.v.shape[-1]) * self.k.element_size()

    @property
    def nbytes(self) -> int:
        """K/V bytes of valid rows."""
        return self.n * self.row_bytes()

    @property
    def reserved_bytes(self) -> int:
        """K/V bytes the buffers occupy, spare capacity included."""
        return self.cap * self.row_bytes()

    # -- views of the valid rows -------------------------------------------------------------------
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.n]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.n]

    def positions(self) -> torch.Tensor:
        return self.meta[:, :, : self.n, POS].long()

    def rotations(self) -> torch.Tensor:
        """Positions the valid keys are currently rotated at."""
        return self.meta[:, :, : self.n, ROT].long()

    def state_view(self) -> dict[str, torch.Tensor]:
        """Per-token policy state as [B, K, n] views: in-place edits land in the buffer."""
        return {name: self.meta[:, :, : self.n, STATE + i] for i, name in enumerate(self.state_names)}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write a policy's replaced per-token state (each [B, K, n] or broadcastable) back in place."""
        for i, name in enumerate(self.state_names):
            if name in state:
                self.meta[:, :, : self.n, STATE + i] = state[name]

    def _buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.meta]

    # -- growth and release -------------------------------------------------------------------------
    def _resize(self, cap: int, like: RowData) -> None:
        new = [torch.empty((*t.shape[:2], cap, t.shape[-1]), dtype=t.dtype, device=self.device, pin_memory=self.pin)
               for t in like]
        if self.k is not None and self.n:
            self._wait()
            for dst, src in zip(new, self._buffers(), strict=True):
                dst[:, :, : self.n] = src[:, :, : self.n]
        self.k, self.v, self.meta = new

    def compact(self, slack: int = 2) -> None:
        """Give spare capacity back to the allocator when over `slack` times the valid rows are reserved.
        Pinned host buffers are kept: allocating pinned memory costs milliseconds per call."""
        if not self.pin and self.cap > slack * self.n + 64:
            self._resize(self.n + self.n // 4 + 16, (self.k, self.v, self.meta))

    def _wait(self) -> None:
        """Host buffers: wait for pending asynchronous device-to-host copies before reading them."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None

    # -- row operations -------------------------------------------------------------------------
    def append(self, data: RowData) -> None:
        q = data[0].shape[2]
        if self.n + q > self.cap:
            growth = self.cap if self.pin else self.cap // 4 + 16  # pinned: double, allocations are slow
            self._resize(max(self.n + q, self.cap + growth), data)
        end = self.n + q
        blocking = not (self.pin and data[0].is_cuda)
        for buf, rows in zip(self._buffers(), data, strict=True):
            buf[:, :, self.n : end].copy_(rows, non_blocking=not blocking)
        if not blocking:
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()
        self.n = end

    def select(self, idx: torch.Tensor) -> RowData:
        """Copies of rows `idx` (1-D: the same rows in every head; else [B, K, k])."""
        self._wait()
        bufs = [t[:, :, : self.n] for t in self._buffers()]
        if idx.dim() == 1:
            return tuple(t.index_select(2, idx) for t in bufs)
        return tuple(t.gather(2, full_index(idx, t)) for t in bufs)

    def swap(self, idx: torch.Tensor, data: RowData | None) -> None:
        """Drop rows `idx` and add `data`: incoming rows fill the holes first, so a freeze plus a thaw
        in one step costs a few row copies."""
        q = 0 if data is None else data[0].shape[2]
        fill = min(q, idx.shape[-1]) if idx.dim() == 1 else 0
        if fill:
            self._wait()
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
        self._wait()
        n, m = self.n, self.n - k
        if idx.dim() == 1:
            hole = torch.zeros(n, dtype=torch.bool, device=idx.device)
            hole[idx] = True
            dst = idx[idx < m]
            src = (~hole[m:]).nonzero().squeeze(-1) + m
            if dst.numel():
                for t in self._buffers():
                    t.index_copy_(2, dst, t.index_select(2, src))
        else:
            keep = torch.ones(idx.shape[0], idx.shape[1], n, dtype=torch.bool, device=idx.device)
            keep.scatter_(2, idx, False)
            kept = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :m]
            for t in self._buffers():
                t[:, :, :m] = t[:, :, :n].gather(2, full_index(kept, t[:, :, :n]))
        self.n = m
