"""The proxy's floor for a method that reads attention at every decode step: `ab.py`'s ratios with one more row,
`observer`, a method that asks for every step's attention rows and never decides (nothing moves, nothing is
scored). What it costs over `full` is the price of reading attention on this host; a method's row above it is its
own rule. `cd CHECKOUT && OMP_NUM_THREADS=1 python reports/bench/evict-fast-path/floor.py [m1,m2,...]`."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path[:0] = [".", "benchmarks", str(Path(__file__).parent)]

import ab  # noqa: E402

from kvbench.policy import ALL_ROWS, KVPolicy, LayerView, available, register  # noqa: E402

available()  # the built-in methods first: `observer` is registered beside them


@register("observer")
@dataclass
class Observer(KVPolicy):
    attn_rows: ClassVar[int] = ALL_ROWS
    observes: ClassVar[bool] = True
    uses_budget: ClassVar[bool] = False

    def step(self, view: LayerView) -> None:
        return None


if __name__ == "__main__":
    sys.argv[1:] = sys.argv[1:] or ["full,observer,attentiontop,lethe"]
    ab.main()
