"""Decoding a handful of sequences together on the CPU: a faster kernel for the model's few-row products, and a
way for kvbench's own work inside such a forward to step out of it."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class FewRowLinear(TorchFunctionMode):
    """While active, `F.linear` on 2..16 rows on the CPU runs as W @ xᵀ: the same product, but MKL does
    [N, K] × [K, B] several times faster than F.linear's [B, K] × [K, N] for a handful of rows, which is what a
    batched decode step is (reports/bench-batch).
    A torch-function mode, so the model code is untouched; rounding differs from F.linear like any change
    of kernel (batch 1 already uses a different one, GEMV)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.shape[:-1].numel()
            if x.device.type == "cpu" and 1 < rows <= 16:
                out = (weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
                if bias is not None:
                    out += bias
                return out.view(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def outside_few_row_linear() -> torch.DisableTorchFunction:
    """For kvbench's own work inside a batched forward (cache appends, attention, policy steps): torch-function
    modes off, so FewRowLinear's Python hook, meant for the model's products, does not run on each of the ~200
    small ops per layer and sequence a policy like ASR-KF-EGR issues."""
    return torch.DisableTorchFunction()
