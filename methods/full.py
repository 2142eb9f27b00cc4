"""Full cache: no compression. The reference row every other method is compared against."""

from dataclasses import dataclass
from typing import ClassVar

from kvbench.policy import Decision, KVPolicy, LayerView, register


@register("full")
@dataclass
class Full(KVPolicy):
    uses_budget: ClassVar[bool] = False
    evicts: ClassVar[bool] = False
    passive: ClassVar[bool] = True

    def step(self, view: LayerView) -> Decision | None:
        return None
