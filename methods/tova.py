"""TOVA, Token Omission Via Attention (Oren et al., 2024, arXiv 2401.06104).

Whenever a layer holds more than the budget, drop the tokens the current (last) query attends to
least, averaged over all heads: one token set per layer. Needs only the last query row each step.

Against the references: TOVA's own code evicts while generating (schedule `decode`, the default). kvpress's
TOVAPress scores once after the prompt and always keeps the last token (its score is set to the maximum);
with schedule `prompt` the kept sets are the same (reports/parity), the last token being kept by its own
attention.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.policy import AcrossLayers, LayerView, ScorerPolicy, register
from kvbench.selection import per_layer


@register("tova")
@dataclass
class TOVA(ScorerPolicy, AcrossLayers):
    attn_rows: ClassVar[int] = 1

    def score(self, view: LayerView) -> torch.Tensor:
        return per_layer(view.attn)
