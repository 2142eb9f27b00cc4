"""Position modes: the rotation a kept key carries and the position the next tokens get once tokens have left
the cache. `original` keeps true positions throughout; `rerotate` turns the kept keys to contiguous in-cache
positions 0..n-1 after every change and continues at n (StreamingLLM's own scheme); `naive` keeps the old
rotations but numbers new tokens from the shrunk length (the "scrambled RoPE" failure of arXiv 2511.04686)."""

from __future__ import annotations

import torch

from kvbench.kv.rope import Rope
from kvbench.kv.rows import ROT, SLOT, Rows

POSITION_MODES = ("original", "rerotate", "naive")


class PositionMode:
    """One cache's position mode; the cache asks it after a layer's rows change and before each forward."""

    def __init__(self, name: str = "original", rope: Rope | None = None) -> None:
        if name not in POSITION_MODES:
            raise ValueError(f"unknown positions mode {name!r}; allowed: {', '.join(POSITION_MODES)}")
        if name == "rerotate" and rope is None:
            raise ValueError("positions=rerotate needs the model's RoPE parameters")
        self.name, self.rope = name, rope

    def settle(self, rows: Rows) -> None:
        """After a layer's active rows changed: in `rerotate`, turn every key to its rank among the layer's true
        positions; their host copies are then stale (a later freeze writes them again)."""
        if self.name != "rerotate":
            return
        target = rows.positions().argsort(-1).argsort(-1)
        delta = target - rows.rotations()
        if bool(delta.any()):
            rows.k[:, :, : rows.n] = self.rope.rotate(rows.keys(), delta)
            rows.meta[:, :, : rows.n, ROT] = target.float()
            turned = (delta != 0).any(dim=1, keepdim=True).expand_as(delta)
            rows.meta[:, :, : rows.n, SLOT].masked_fill_(turned, -1)

    def next_rotations(self, positions: torch.Tensor, active: list[int], method: str) -> torch.Tensor:
        """Positions to give the model for the next tokens (true `positions`, [1, q]), given each layer's active
        token count (`naive` follows layer 0, as `get_seq_length()` would)."""
        if self.name == "original":
            return positions
        if self.name == "rerotate" and len(set(active)) > 1:
            raise ValueError(f"positions=rerotate needs every layer to hold the same number of tokens, but method "
                             f"{method!r} keeps {min(active)}..{max(active)}; use original or naive")
        n = active[0]
        return torch.arange(n, n + positions.shape[-1], device=positions.device)[None]
