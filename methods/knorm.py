"""Knorm (Devoto et al., 2024, arXiv 2406.11430; kvpress's KnormPress): keys with a small L2 norm
draw the most attention, so over budget each KV head keeps the `budget` keys of lowest norm. Needs no
attention statistics at all.

Against the reference: kvpress compresses once after the prompt (schedule `prompt`, the default here),
where its kept set and kvbench's are the same. Run while decoding (schedule `decode`), the rule alone
would evict the token just generated whenever its key norm is high, which derails generation, so the
newest `recent` tokens (8, kvbench's choice) are kept while decoding or reading a question; the
reference never needs this.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.policy import LayerView, ScorerPolicy, param, register
from kvbench.selection import top_k


@register("knorm")
@dataclass
class Knorm(ScorerPolicy):
    default_schedule: ClassVar[str] = "prompt"
    recent: int = param(8, low=0)

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)  # low norm kept

    def protected(self, view: LayerView, capacity: int) -> tuple[torch.Tensor, int] | None:
        if view.phase == "prefill":
            return None
        protect = min(self.recent, capacity)
        return top_k(view.positions.float(), protect), protect  # each head's newest (as many in every head)
