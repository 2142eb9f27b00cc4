"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023, arXiv 2306.14048).

Each token's score is the attention it has received, accumulated over every query so far (prefill
and decode), per KV head (summed over the query heads sharing it). Over budget, a head keeps its
`heavy_ratio` share of the budget as the highest-scoring tokens and the rest as the most recent
tokens: the paper's default splits the budget in halves.

Against the references: the paper's code evicts while generating (schedule `decode`, the default). kvpress
has no H2O: its ObservedAttentionPress is a one-shot relative (scores divided by the number of queries that
could see each token, no recent half), so kept sets are not compared.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.policy import ALL_ROWS, AcrossLayers, LayerView, ScorerPolicy, param, register
from kvbench.selection import accumulate, per_kv_head, recent


@register("h2o")
@dataclass
class H2O(ScorerPolicy, AcrossLayers):
    attn_rows: ClassVar[int] = ALL_ROWS
    token_state: ClassVar[tuple[str, ...]] = ("score",)
    observes: ClassVar[bool] = True  # scores accumulate over every query, whatever the schedule
    heavy_ratio: float = param(0.5, low=0, high=1)  # share of the budget kept by score

    def score(self, view: LayerView) -> torch.Tensor:
        return accumulate(view, "score", per_kv_head(view.attn))

    def protected(self, view: LayerView, capacity: int) -> tuple[torch.Tensor, int]:
        recent_share = capacity - int(capacity * self.heavy_ratio)
        return recent(view.positions, view.seen, recent_share), recent_share
