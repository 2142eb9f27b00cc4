"""SnapKV (Li et al., 2024, arXiv 2404.14469) and PyramidKV (Cai et al., 2024, arXiv 2406.02069).

SnapKV compresses the prompt once, when prefill ends: the last `window` prompt queries (the
observation window) vote with their attention, summed per KV head; votes are max-pooled over
neighbouring tokens (kernel 7) so kept tokens keep their context; each head keeps its top
(budget - window) tokens plus the window itself. Decoding then appends without further eviction,
and earlier prefill chunks are not compressed (the peak is the whole prompt), as in the paper.
`every_chunk=True` compresses after every prefill chunk instead (each chunk's last `window` queries
vote), which bounds the peak at budget + one chunk, at the price of judging early tokens before the
question at the end of the prompt is seen.

PyramidKV is SnapKV with per-layer budgets that shrink linearly with depth: layer 0 gets
2B - B/beta, the last layer B/beta, averaging the budget B (beta = 20 in the paper).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from kvbench.policy import Decision, KVPolicy, LayerView, register
from kvbench.select import per_kv_head, recent, top_k


@register("snapkv")
@dataclass
class SnapKV(KVPolicy):
    window: int = 32
    kernel: int = 7
    every_chunk: bool = False

    def wants_attention(self, phase: str, last_chunk: bool) -> int:
        return self.window if phase == "prefill" and (last_chunk or self.every_chunk) else 0

    def layer_capacity(self, view: LayerView) -> int:
        return self.capacity(view.full_tokens)

    def step(self, view: LayerView) -> Decision | None:
        cap = self.layer_capacity(view)
        if view.attn is None or view.n <= cap:
            return None
        votes = per_kv_head(view.attn)  # [B, K, n]
        b, k, n = votes.shape
        votes = F.max_pool1d(votes.reshape(b * k, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        window = recent(view.positions, view.seen, min(self.window, cap))
        kept_window = min(self.window, cap)  # the last `window` positions are all still active here
        return Decision(keep=window | top_k(votes.reshape(b, k, n), cap - kept_window, exclude=window))


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    uniform_layers: ClassVar[bool] = False
    beta: float = 20.0

    def layer_capacity(self, view: LayerView) -> int:
        mean = self.capacity(view.full_tokens)
        low = mean / self.beta
        high = 2 * mean - low
        return max(1, round(high - (high - low) * view.layer_idx / max(1, view.num_layers - 1)))
