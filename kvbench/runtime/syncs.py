"""Counting what a step asks of the host where the host decides its cost (a big model on a GPU at batch 1).

`HostSyncs`: the calls that force a host synchronisation (a tensor's value read on the host: `item`, `bool`, `int`,
`float`, `tolist`, `nonzero`'s data-dependent shape). On a GPU each one stalls the host until the device catches up;
on a CPU nothing stalls, but the same calls are counted, so a test here sees what a GPU would pay. `DispatchedOps`:
the tensor ops dispatched, views included, each a launch. Both are modes, no patch: they see only the code run inside
them, and a count does not move with the host's load as a time does."""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

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


class DispatchedOps(TorchDispatchMode):
    """`with DispatchedOps() as ops: ...`; then `ops.total`, and `ops.names` (each op's count by its ATen name)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.names.values())

    def __torch_dispatch__(self, func, types, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))
