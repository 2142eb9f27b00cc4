"""FrozenStore: one layer's off-device copies of frozen tokens, written once per token.

A token's K and V never change once it is in the cache (unless `rerotate` turns its key, which
forgets the copy), so after a thaw its host copy stays valid. Re-freezing a token that was frozen
before then costs no device-to-host copy of K/V: its slot is marked live again and only its meta row
(position and policy state, a few floats) is refreshed. ASR-KF-EGR's sublinear schedule freezes and
thaws the same tokens over and over (a token frozen for one step is thawed, attended once and frozen
again), so this halves the rows it moves per step.

Buffers have the active cache's layout ([B, K, cap, d]; meta [B, K, cap, C] with the columns of
kvbench/kv/rows.py) and rows are gathered through the [B*K, cap, c] view (`rows.gather`), so a thaw
hands the active buffer contiguous rows in its own layout (scattering a permuted, token-major source
into it was the slower half of a thaw: ~1 ms per decode step at 4k for ASR-KF-EGR). One slot serves
every head, so freeze and thaw decisions must agree across heads (PolicyLayer checks). Slots are
append-only: `live` marks those whose token is frozen now, and slot order is the order in which a
policy sees the frozen tokens (`positions()`, `view()`, thaw masks). Copies of thawed tokens stay
held (`held_bytes`, reported); at most one per token, so the store never exceeds a full cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbench.kv.rows import POS, SLOT, STATE, RowData, TokenRows, gather


class FrozenStore(TokenRows):
    def __init__(self, state_names: tuple[str, ...], pin: bool) -> None:
        self.state_names = state_names
        self.pin = pin  # pinned host memory (a CUDA run)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.meta: torch.Tensor | None = None
        self.used = 0  # slots written
        self.live = torch.zeros(0, dtype=torch.bool)
        self.n = 0  # frozen tokens now
        self._slots: torch.Tensor | None = None  # live slots, ascending (cached until the next change)
        self._viewed: tuple | None = None  # the last view: slots, meta rows, their version, the state handed out
        self._copy_done: torch.cuda.Event | None = None  # pending device-to-host copy of K/V (CUDA)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """K/V bytes of every copy held, including those of tokens that are active again."""
        return self.used * self.row_bytes()

    # -- the frozen tokens, in slot order ([B, K, m, ...] views) -------------------------------------
    def slots(self) -> torch.Tensor:
        if self._slots is None:
            self._slots = self.live.nonzero().squeeze(-1)
        return self._slots

    def _written(self) -> int:
        self._wait()  # a copy still landing in the buffers lands before they are read or rewritten
        return self.used

    def keys(self) -> torch.Tensor:
        self._wait()
        return self._decoded(gather(self.k, self.slots()), self.key_codec)

    def values(self) -> torch.Tensor:
        self._wait()
        return self._decoded(gather(self.v, self.slots()), self.value_codec)

    def positions(self) -> torch.Tensor:
        return self._split(gather(self.meta, self.slots()))[0]

    def state_view(self) -> dict[str, torch.Tensor]:
        """Copies of the frozen tokens' policy state (read-only use; a policy gets its state from `view`)."""
        return self._split(gather(self.meta, self.slots()))[1]

    def view(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Positions and policy state of the frozen tokens, from one gather of their meta rows. The state
        entries are views of that copy: `write_back` stores them, edited in place or replaced."""
        with torch.inference_mode(False):  # a normal tensor, whose version counter shows in-place edits
            meta = gather(self.meta, self.slots())
        positions, state = self._split(meta)
        self._viewed = (self.slots(), meta, meta._version, state)
        return positions, state

    def _split(self, meta: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return meta[..., POS].long(), {name: meta[..., STATE + i] for i, name in enumerate(self.state_names)}

    def write_back(self, state: dict[str, torch.Tensor]) -> None:
        """Store the state handed out by the last `view` (a policy may edit it in place or replace entries).
        Untouched state (the common case: a policy reads the frozen tokens' state to pick thaws) is not copied
        back: in-place edits show in the version counter the copy shares with its views."""
        slots, meta, version, handed = self._viewed
        replaced = [(i, t) for i, name in enumerate(self.state_names)
                    if (t := state.get(name)) is not None and t is not handed[name]]
        if not replaced and meta._version == version:
            return
        for i, t in replaced:
            meta[..., STATE + i] = t.to(meta.device)
        self.meta.flatten(0, 1).index_copy_(1, slots, meta.flatten(0, 1))

    # -- freeze and thaw ---------------------------------------------------------------------------
    def take(self, idx: torch.Tensor) -> RowData:
        """Thaw the frozen tokens at `idx` (1-D, into slot order): copies of their rows as [B, K, k, c];
        their meta keeps the slot, so a later freeze finds the copy."""
        slots = self.slots()[idx]
        self._wait()
        rows = tuple(gather(t, slots) for t in (self.k, self.v, self.meta))
        self._mark(slots, False)
        return rows

    def put(self, meta: torch.Tensor, fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Freeze tokens given their meta rows [B, K, k, C] (on the host). Tokens without a copy (slot < 0)
        get one: `fetch(mask)` returns their K and V ([B, K, c, d], on the compute device); on CUDA they are
        copied into pinned memory asynchronously, and readers wait for the copy. Returns the K/V bytes copied."""
        slot = meta[0, 0, :, SLOT].long()
        new = slot < 0
        copied = 0
        if bool(new.any()):
            k, v = fetch(new)
            count = k.shape[2]
            slot[new] = torch.arange(self.used, self.used + count)
            meta[:, :, new, SLOT] = slot[new].float()
            self._reserve(self.used + count, (k, v, meta))
            for buf, rows in ((self.k, k), (self.v, v)):
                if self.pin:  # into pinned memory head by head: contiguous targets keep the copy asynchronous
                    for dst, src in zip(buf.flatten(0, 1), rows.flatten(0, 1), strict=True):
                        dst[self.used : self.used + count].copy_(src, non_blocking=True)
                else:  # host to host: one strided copy per buffer
                    buf[:, :, self.used : self.used + count] = rows
            if self.pin and k.is_cuda:
                self._copy_done = torch.cuda.Event()
                self._copy_done.record()
            self.used += count
            self.live = torch.cat([self.live, torch.zeros(count, dtype=torch.bool)])
            copied = k.nbytes + v.nbytes
        self.meta.flatten(0, 1).index_copy_(1, slot, meta.flatten(0, 1))  # fresh policy state of every token frozen now
        self._mark(slot, True)
        return copied

    def discard(self, idx: torch.Tensor) -> None:
        """Forget the frozen tokens at `idx` (1-D, into slot order) for good: they left a sliding window."""
        if idx.numel():
            self._mark(self.slots()[idx], False)

    def _reserve(self, rows: int, like: RowData) -> None:
        """Room for `rows` slots, doubling (pinned allocations are slow, and the store only grows)."""
        cap = 0 if self.k is None else self.k.shape[2]
        if rows <= cap:
            return
        cap = max(rows, 2 * cap)
        new = [torch.empty((t.shape[0], t.shape[1], cap, t.shape[3]), dtype=t.dtype, pin_memory=self.pin)
               for t in like]
        if self.used:
            self._wait()
            for dst, src in zip(new, (self.k, self.v, self.meta), strict=True):
                dst[:, :, : self.used] = src[:, :, : self.used]
        self.k, self.v, self.meta = new

    def _wait(self) -> None:
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None

    def _mark(self, slots: torch.Tensor, live: bool) -> None:
        self.live[slots] = live
        self.n = int(self.live.sum())
        self._slots = None
