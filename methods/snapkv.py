"""SnapKV (Li et al., 2024, arXiv 2404.14469) and PyramidKV (Cai et al., 2024, arXiv 2406.02069).

SnapKV compresses the prompt once, when prefill ends (schedule `prompt`, the paper's and kvpress's): the
last `window` prompt queries (the observation window) vote with their attention, summed per KV head;
votes are pooled over neighbouring positions (max, kernel 7) so kept tokens keep their context; each
head keeps its top (budget - window) tokens plus the window itself. Decoding then appends without
further eviction, and earlier prefill chunks are not compressed (the peak is the whole prompt).
Schedule `chunk` compresses after every prefill chunk instead (each chunk's last `window` queries vote),
which bounds the peak at budget + one chunk, at the price of judging early tokens before the question
at the end of the prompt is seen. Pooling runs in position order: after an eviction the cache's rows
are not (removal moves the last rows into the holes), and neighbours are positions, not rows.

Against the references: kvpress's SnapKVPress scores the window's attention itself (it recomputes the
window queries against the keys) and pools with an average (window 64, kernel 5): `pooling=avg,
window=64, kernel=5` is that configuration. kvbench uses the attention rows the forward already computed,
which are the same numbers.

PyramidKV is SnapKV with per-layer budgets that shrink linearly with depth: layer 0 gets
2B - B/beta, the last layer B/beta, averaging the budget B (beta = 20 in the paper). kvpress's PyramidKVPress
differs in two places (reports/parity): it caps the first layers at (prompt - window) and redistributes, and
where a layer's budget is below the window it keeps an arbitrary part of the window (all tie at the top
score); kvbench keeps the newest.
"""

from dataclasses import dataclass
from typing import ClassVar

from kvbench.policy import Decision, KVPolicy, LayerView, param, register
from kvbench.selection import in_position_order, per_kv_head, pool, recent, top_k


@register("snapkv")
@dataclass
class SnapKV(KVPolicy):
    schedules: ClassVar[tuple[str, ...]] = ("prompt", "chunk")  # its votes are prompt queries
    default_schedule: ClassVar[str] = "prompt"
    window: int = param(32, low=1)
    kernel: int = param(7, low=1)
    pooling: str = param("max", choices=("max", "avg"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel % 2 == 0:
            raise ValueError(f"method {self.name!r}: kernel={self.kernel} must be odd (a pooling window centred on "
                             "its token)")

    def wants_attention(self, phase: str, last_chunk: bool) -> int:
        return self.window if phase == "prefill" and self.compresses(phase, last_chunk) else 0

    def layer_capacity(self, view: LayerView) -> int:
        return self.capacity(view.full_tokens)

    def step(self, view: LayerView) -> Decision | None:
        cap = self.layer_capacity(view)
        if view.attn is None or view.n <= cap:
            return None
        kept_window = min(self.window, cap)  # the last `window` positions are all still active here
        order, unsort = in_position_order(view.positions)
        window = recent(view.positions, view.seen, kept_window).gather(-1, order)
        # the window's own votes stay out of the pooling (as the references slice it off before pooling)
        votes = per_kv_head(view.attn).gather(-1, order).masked_fill(window, 0.0)  # [B, K, n], in position order
        pooled = pool(votes, self.kernel, self.pooling)
        return Decision(keep=unsort(window | top_k(pooled, cap - kept_window, exclude=window)))


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    uniform_layers: ClassVar[bool] = False
    beta: float = param(20.0, low=1)  # the first layer keeps 2 - 1/beta times the mean, the last 1/beta

    def layer_capacity(self, view: LayerView) -> int:
        mean = self.capacity(view.full_tokens)
        low = mean / self.beta
        high = 2 * mean - low
        return max(1, round(high - (high - low) * view.layer_idx / max(1, view.num_layers - 1)))
