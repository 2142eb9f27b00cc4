"""Counting the calls that force a host synchronisation (a tensor's value read on the host: `item`, `bool`, `int`,
`float`, `tolist`, `nonzero`'s data-dependent shape). On a GPU each one stalls the host until the device catches up,
so in the host-bound regime they decide a step's cost; on a CPU nothing stalls, but the same calls are counted, so a
test here sees what a GPU would pay. A torch-function mode, no patch: it sees only the code run inside it."""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
           torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}


class HostSyncs(TorchFunctionMode):
    """`with HostSyncs() as syncs: ...`; then `syncs.total`, and `syncs.sites` (kvbench's file:line that asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SYNCING:
            frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                          if "/kvbench/" in f.filename or "/methods/" in f.filename), None)
            self.sites[f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                       if frame else "elsewhere"] += 1
        return func(*args, **(kwargs or {}))
