"""KVzip (Kim et al., 2025, arXiv 2505.23416): query-agnostic prompt compression by context reconstruction.

After the prompt, the engine feeds "repeat the previous context" followed by the context itself as
scratch tokens, in 2k-token slices of the context; each context token's score is the highest
attention any repeat query (of its KV head's query heads) pays it. The scratch is then dropped and
each KV head keeps its `budget` highest-scoring tokens. Decoding appends without further eviction.
The reconstruction pass is part of the measured prefill time.

Fast KVzip (arXiv 2601.17668) replaces the pass with learned gates; no gate weights exist for the
bundled models, so only the training-free score is implemented.

Against kvpress's KVzipPress: kvpress by default ranks all layers together (per-layer ratios differ, the
total is kept) and always keeps 4 sink tokens; kvbench gives every layer the same budget (kvpress's
`layerwise=True`) and protects no sink.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.policy import ALL_ROWS, LayerView, Reconstructs, ScorerPolicy, register


@register("kvzip")
@dataclass
class KVzip(ScorerPolicy, Reconstructs):
    token_state: ClassVar[tuple[str, ...]] = ("score",)
    reconstruction_prompt: ClassVar[str] = "\n\nRepeat the previous context exactly.\n\n"
    observes: ClassVar[bool] = True  # scores come from the reconstruction pass, applied after it
    schedules: ClassVar[tuple[str, ...]] = ("prompt",)
    default_schedule: ClassVar[str] = "prompt"

    def wants_attention(self, phase: str, last_chunk: bool) -> int:
        return ALL_ROWS if phase == "reconstruct" else 0

    def score(self, view: LayerView) -> torch.Tensor | None:
        """The most attention any reconstruction query gave each token; applied in the compress phase only."""
        if view.phase == "reconstruct":
            view.state["score"] = torch.maximum(view.state["score"], view.attn.amax(dim=(2, 3)))
        return view.state["score"] if view.phase == "compress" else None
