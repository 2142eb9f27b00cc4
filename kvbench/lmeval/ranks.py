"""The processes of a data-parallel `lm_eval` run, as torch.distributed ranks.

`torchrun --nproc_per_node N -m lm_eval --model kvbench-hf ...` (or `accelerate launch`, which sets the same
environment) starts N processes. lm-eval's evaluator gives each its share of the documents when the model reports
its rank and the world size, and gathers the per-document metrics back to rank 0 through the model's `all_gather`,
`gather_object` and `barrier`; these come from here. On CPU the ranks talk over gloo, on CUDA over NCCL with one
device per rank (`cuda:LOCAL_RANK`). Without a launcher there is one rank and nothing is initialised.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_launcher(cls, device: str) -> Ranks:
        """This process's place among those a launcher started (WORLD_SIZE > 1), joining their process group."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
            atexit.register(dist.destroy_process_group)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, device: str) -> str:
        """The device this rank computes on: `cuda` means this rank's own GPU when there are several ranks."""
        if self.world_size > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, concatenated in rank order (0-d tensors stacked), as accelerate's `gather` gives."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's `obj` in rank order on `dst`; None elsewhere."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
