"""Knorm (Devoto et al., 2024, arXiv 2406.11430; kvpress's KnormPress): keys with a small L2 norm
draw the most attention, so over budget each KV head keeps the `budget` keys of lowest norm. Needs no
attention statistics at all.
"""

from dataclasses import dataclass

from kvbench.policy import Decision, KVPolicy, LayerView, register
from kvbench.select import top_k


@register("knorm")
@dataclass
class Knorm(KVPolicy):
    def step(self, view: LayerView) -> Decision | None:
        cap = self.capacity(view.full_tokens)
        if view.n <= cap:
            return None
        return Decision(keep=top_k(-view.keys.float().norm(dim=-1), cap))
