"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks plus a recent window.

Keeps the first `sinks` tokens and the most recent (budget - sinks) tokens; needs no attention
statistics, so it costs nothing beyond the eviction itself.

Against the references: the original code evicts at every generation step (schedule `decode`, the default)
and numbers positions inside the cache (`--positions rerotate`). kvpress's StreamingLLMPress compresses once
after the prompt; with schedule `prompt` the kept set is the same (reports/parity).
"""

from dataclasses import dataclass

from kvbench.policy import AcrossLayers, Decision, KVPolicy, LayerView, param, register
from kvbench.selection import recent, sinks


@register("streamingllm")
@dataclass
class StreamingLLM(KVPolicy, AcrossLayers):
    sinks: int = param(4, low=0)

    def step(self, view: LayerView) -> Decision | None:
        cap = self.capacity(view.full_tokens)
        if view.n <= cap:
            return None
        first = min(self.sinks, cap)
        return Decision(keep=sinks(view.positions, first) | recent(view.positions, view.seen, cap - first))
