"""Lethe (arXiv 2511.06029): layer-adaptive pruning driven by decayed cumulative attention.

Choices the paper leaves open, each a parameter:
- score: s <- gamma * s + (attention of this step's queries, mean over the layer's heads), gamma 0.9.
- trigger: each layer prunes only when it holds more than its threshold, which starts at the
  budget. Pruning looks for an attention drop-off: the smallest set of tokens holding `mass` (0.9)
  of the layer's score. If that set is at most `dropoff` (0.5) of the tokens, attention is
  concentrated: keep salient ∪ the first `sinks` (4) ∪ the most recent `recent` (30%) of the
  budget, evict the rest. If not, attention is flat, nothing is evicted and the layer's threshold
  doubles (so flat layers keep more, as in the paper's layer adaptivity).
- sparsity: the Hoyer sparsity of each layer's score, (sqrt(n) - L1/L2) / (sqrt(n) - 1), is
  logged at every trigger and reported as a per-layer mean.

No reference implementation in reach (not in kvpress); the rules below are kvbench's reading of the paper.
"""

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvbench.policy import ALL_ROWS, Decision, KVPolicy, LayerView, param, register
from kvbench.selection import accumulate, per_layer, recent, sinks


def hoyer(x: torch.Tensor) -> float:
    n = x.shape[-1]
    if n < 2:
        return 0.0
    ratio = float(x.abs().sum() / x.norm().clamp_min(1e-12))
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


@register("lethe")
@dataclass
class Lethe(KVPolicy):
    attn_rows: ClassVar[int] = ALL_ROWS
    token_state: ClassVar[tuple[str, ...]] = ("score",)
    uniform_layers: ClassVar[bool] = False
    observes: ClassVar[bool] = True
    schedules: ClassVar[tuple[str, ...]] = ("decode",)  # its thresholds adapt step by step
    bounded: ClassVar[bool] = False  # a flat layer doubles its threshold: the budget is where thresholds start
    gamma: float = param(0.9, low=0, high=1, low_open=True)
    mass: float = param(0.9, low=0, high=1, low_open=True)
    dropoff: float = param(0.5, low=0, high=1, low_open=True)
    sinks: int = param(4, low=0)
    recent: float = param(0.3, low=0, high=1)
    _threshold: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _sparsity: dict[int, list[float]] = field(default_factory=dict, init=False, repr=False)
    _doublings: int = field(default=0, init=False, repr=False)

    def reset(self) -> None:
        self._threshold, self._sparsity, self._doublings = {}, {}, 0

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if not k.startswith("_")}

    def report(self) -> dict[str, Any]:
        return {"hoyer_by_layer": {str(i): sum(v) / len(v) for i, v in sorted(self._sparsity.items())},
                "threshold_doublings": self._doublings}

    def step(self, view: LayerView) -> Decision | None:
        score = accumulate(view, "score", per_layer(view.attn), decay=self.gamma)
        cap = self.capacity(view.full_tokens)
        threshold = self._threshold.setdefault(view.layer_idx, cap)
        if view.n <= threshold:
            return None
        score = score[:, 0]  # [B, n]
        self._sparsity.setdefault(view.layer_idx, []).append(hoyer(score[0]))
        ordered = score.sort(dim=-1, descending=True)
        cumulative = ordered.values.cumsum(-1) / ordered.values.sum(-1, keepdim=True).clamp_min(1e-12)
        salient_count = int((cumulative < self.mass).sum(-1).max()) + 1
        if salient_count > self.dropoff * view.n:
            self._threshold[view.layer_idx] = 2 * threshold
            self._doublings += 1
            return None
        salient = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, ordered.indices[:, :salient_count], True)
        pos = view.positions[:, :1]
        window = recent(pos, view.seen, math.ceil(self.recent * cap))
        return Decision(keep=salient[:, None] | sinks(pos, self.sinks) | window)
