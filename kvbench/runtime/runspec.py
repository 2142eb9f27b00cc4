"""One run's configuration: a method with its budget and parameters, how positions continue after eviction, and
where the question goes. `kvbench compare`, the leaderboard sweep, `kvbench bench` and the lm-eval adapter all
build their runs with `RunSpec.build`, so a value is refused by the same rule, with the same allowed values,
whichever front end it came through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.kv.positions import POSITION_MODES
from kvbench.kv.quant import codec
from kvbench.policy import Budget, KVPolicy, make_policy, policy_class
from kvbench.runtime.engine import QUERY_MODES


@dataclass(frozen=True)
class RunSpec:
    """A checked configuration: a method that takes a budget has one, one that takes none has none; the position
    mode and query mode are known; `rerotate` only for a method whose layers hold equally many tokens. A method
    that never evicts runs in `original` positions (the modes differ only after an eviction)."""

    policy: KVPolicy
    positions: str = "original"
    query: str = "in-prompt"
    kv_quant: str | None = None  # how K/V rows are stored (kvbench/kv/quant.py); None: the model's dtype

    def __post_init__(self) -> None:
        name = self.policy.name
        if self.policy.uses_budget and self.policy.budget is None:
            raise ValueError(f"method {name!r} needs a budget: tokens (256) or a ratio of the tokens seen (0.25), "
                             "as --budget, a sweep row's budgets, or budget= in lm-eval's --model_args")
        if not self.policy.uses_budget and self.policy.budget is not None:
            raise ValueError(f"method {name!r} takes no budget (its parameters set how much it keeps); "
                             f"drop budget={Budget.label(self.policy.budget.to_json())}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions={self.positions!r} is not a position mode; "
                             f"allowed: {', '.join(POSITION_MODES)}")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query={self.query!r} is not a query mode; allowed: {', '.join(QUERY_MODES)}")
        if self.positions == "rerotate" and not self.policy.uniform_layers:
            raise ValueError(f"positions=rerotate needs the same token count in every layer; {name!r} keeps "
                             "per-layer sets of different sizes (use original or naive)")
        if codec(self.kv_quant) is None:  # an unknown scheme raises, naming the allowed ones
            object.__setattr__(self, "kv_quant", None)
        elif self.positions == "rerotate":
            raise ValueError(f"positions=rerotate turns stored keys after each eviction, which would quantize them "
                             f"again each time; with kv_quant={self.kv_quant} use original or naive")
        if not self.policy.evicts:
            object.__setattr__(self, "positions", "original")

    @classmethod
    def build(cls, method: str, budget: Budget | str | int | None = None, params: dict[str, Any] | None = None,
              positions: str = "original", query: str = "in-prompt", kv_quant: str | None = None) -> RunSpec:
        """The run from the values a user wrote (strings from a command line or a sweep file, numbers from
        lm-eval's model args): the method and its parameter names are checked and the values coerced by
        `make_policy`, the rest here."""
        return cls(make_policy(method, budget, **(params or {})), positions, query, kv_quant)

    @staticmethod
    def takes_budget(method: str) -> bool:
        """Whether `method` runs at a budget (a front end's budget list applies to it) or sets its own memory."""
        return policy_class(method).uses_budget

    @property
    def method(self) -> str:
        return self.policy.name
