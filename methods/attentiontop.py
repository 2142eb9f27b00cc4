"""AttentionTop (arXiv 2511.04686, "Stateful KV Cache Management for LLMs"): once a layer holds more
than the budget, keep the top ceil(r * n) tokens by attention accumulated over every query so far
(mean over the layer's heads: one token set per layer). With the paper's r = 0.99, each step over
budget drops the least-attended 1%, so the cache shrinks towards the budget gradually.

No reference implementation in reach (not in kvpress); built from the paper's text.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

from kvbench.policy import ALL_ROWS, AcrossLayers, Decision, KVPolicy, LayerView, keep_top, param, register
from kvbench.selection import accumulate, per_layer


@register("attentiontop")
@dataclass
class AttentionTop(KVPolicy, AcrossLayers):
    attn_rows: ClassVar[int] = ALL_ROWS
    token_state: ClassVar[tuple[str, ...]] = ("score",)
    observes: ClassVar[bool] = True
    schedules: ClassVar[tuple[str, ...]] = ("decode",)  # shrinks by 1% per step: defined only as a running rule
    bounded: ClassVar[bool] = False  # the same: the budget is where it shrinks towards, not a cap
    r: float = param(0.99, low=0, high=1, low_open=True)

    def step(self, view: LayerView) -> Decision | None:
        score = accumulate(view, "score", per_layer(view.attn))
        if view.n <= self.capacity(view.full_tokens):
            return None
        return keep_top(score, math.ceil(self.r * view.n))
