"""The KVPolicy contract: a policy looks at one layer's cache and returns a Decision.

Policies decide, the cache moves data. A policy never gathers, copies or offloads tensors:
it returns boolean masks over the active (and frozen) tokens, and `PolicyCache` applies them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import torch

from kvbench.selection import bottom_k, top_k

ALL_ROWS = sys.maxsize
"""`attn_rows` value asking for the attention of every query of the step (H2O's accumulation)."""

FEW_EVICTED = 8
"""At most this many evicted tokens a row (a decode step's), a scorer names them (`Decision.evict`) instead of a mask
of the kept ones, where `bottom_k` finds them unambiguous."""
SCHEDULES = ("prompt", "chunk", "decode")
"""When a method's decisions are applied: once at the end of each prompt (kvpress's default), after every prefill
chunk, or also at every decode step and question token. Compared across tools, a schedule changes the kept set as
much as the scoring rule does, so it is a recorded parameter of every run (`schedule=`)."""


@dataclass(frozen=True)
class Range:
    """The values a method parameter admits: a closed or open interval of finite numbers, or a set of names.
    Declared with the parameter (`param`) and checked whenever a policy is built, so a value out of range is refused
    by name before any model loads, whichever front end it came through."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "any finite number"


def param(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
          high_open: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A method parameter with the values it admits (a dataclass field): `sinks: int = param(4, low=0)`."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open, choices)})


def parameter_range(f: dataclasses.Field) -> Range | None:
    """The declared range of a method parameter; None for a boolean (its type is its range) or an undeclared one."""
    return f.metadata.get("range")


@dataclass(frozen=True)
class Budget:
    """How many active tokens a layer may hold: a token count, or a ratio of the tokens seen."""

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("a budget is either a token count or a ratio, exactly one of them")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"budget must be a positive token count, got {self.tokens}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            hint = f" (for {self.ratio:.0f} tokens write {self.ratio:.0f})" if float(self.ratio).is_integer() else ""
            raise ValueError(f"a budget ratio must lie in (0, 1], got {self.ratio}{hint}")

    @classmethod
    def parse(cls, text: str | int | float) -> Budget:
        """'256' -> 256 tokens; '0.25' -> a quarter of the tokens seen."""
        s = str(text).strip()
        try:
            if any(c in s for c in ".eE"):
                return cls(ratio=float(s))
            return cls(tokens=int(s))
        except ValueError as err:
            if "budget" in str(err):
                raise
            raise ValueError(
                f"budget {text!r} is neither a positive token count (e.g. 256) "
                "nor a ratio in (0, 1] (e.g. 0.25)"
            ) from None

    def capacity(self, seen: int) -> int:
        """Active tokens allowed once `seen` tokens have gone through the layer."""
        if self.tokens is not None:
            return self.tokens
        return max(1, int(self.ratio * seen))

    def __str__(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"{self.ratio:g}"

    def to_json(self) -> dict[str, int | float]:
        """{"tokens": 256} or {"ratio": 0.25}: typed, and never ambiguous (a ratio of 1 is not 1 token)."""
        return {"tokens": self.tokens} if self.tokens is not None else {"ratio": self.ratio}

    @staticmethod
    def label(value: dict[str, int | float] | None) -> str:
        """A results file's budget as the CLI writes it ('256', '0.25'); 'all' for a method without one."""
        return str(Budget(**value)) if value else "all"


class Phase(StrEnum):
    """What a forward does. The engine names it for each step (`SequenceStep.begin`); the driver hands it to
    the policy (`LayerView.phase`) and to its schedule. A StrEnum: a method may compare it with plain strings."""

    PREFILL = "prefill"  # prompt tokens, in chunks (and a continuation being scored)
    DECODE = "decode"  # one generated token
    QUERY = "query"  # a question fed after its context was compressed (`--query after|reuse`)
    RECONSTRUCT = "reconstruct"  # scratch tokens of a reconstruction pass (KVzip), dropped afterwards
    COMPRESS = "compress"  # right after that pass: attn is None, the policy's scores are complete


@dataclass
class LayerView:
    """Read-only view of one layer after a cache update, handed to `KVPolicy.step`.

    Shapes: B = batch, K = KV heads, n = active tokens, m = frozen tokens, G = query heads per KV
    head, w = requested query rows. `state` holds the policy's own per-token tensors ([B, K, n]),
    which the cache keeps aligned with the tokens through every eviction, freeze and thaw; the
    policy may edit them in place or replace entries (same shape) but never moves KV data. Frozen
    tokens are listed in the store's slot order, not by position; freeze and thaw masks must be the
    same for every KV head (the store keeps one copy per token).
    """

    layer_idx: int
    num_layers: int
    keys: torch.Tensor  # [B, K, n, d], RoPE already applied at each token's true position
    values: torch.Tensor  # [B, K, n, d]
    positions: torch.Tensor  # [B, K, n] true (original) positions
    new_tokens: int  # tokens appended by this step (the last `new_tokens` of the active set)
    seen: int  # tokens that have gone through this layer so far
    attn: torch.Tensor | None  # [B, K, G, w, n] softmax rows of the last w queries, fp32
    state: dict[str, torch.Tensor]
    frozen_positions: torch.Tensor | None = None  # [B, K, m]
    frozen_state: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, K, m] each, edits are kept
    step: int = 0  # forward passes so far (prefill chunks + decode steps)
    phase: Phase = Phase.PREFILL
    window: int | None = None  # the layer's sliding window; tokens older than its last w - 1 are already gone
    # tokens this layer would hold with the full cache: all seen, or a sliding window's last w - 1; budgets
    # are capacities of this (a ratio budget on a sliding layer is a share of the window)
    full_tokens: int = 0
    # [B, K, G, q, m]: before attention (`on_queries`), the probability each of this step's q queries would give
    # each frozen token were it active (one softmax over active and frozen keys, scale, soft-cap and window
    # applied as the layer's attention applies them); None elsewhere
    frozen_attn: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.positions.shape[-1]

    @property
    def prefill(self) -> bool:
        """Several tokens at once (a prompt chunk, a question, a reconstruction pass), not one decode step."""
        return self.phase != Phase.DECODE


@dataclass
class Decision:
    """What to do with the tokens of one layer. Masks broadcast to [B, K, n] (or [B, K, m]).

    keep:   active tokens that stay active (None: all those not frozen, i.e. evict nothing).
    freeze: active tokens moved to the off-device store (must not overlap `keep`).
    thaw:   frozen tokens restored to the active cache.
    Active tokens neither kept nor frozen are evicted for good.
    evict:  instead of `keep`, the rows evicted as indices [B, K|1, e] (the same count in every row, nothing frozen
            or thawed): what a ranking already holds at a decode step, so no mask is built and searched again.
    """

    keep: torch.Tensor | None = None
    freeze: torch.Tensor | None = None
    thaw: torch.Tensor | None = None
    evict: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.evict is not None and (self.keep is not None or self.freeze is not None or self.thaw is not None):
            raise ValueError("a decision gives either `evict` (row indices) alone or masks (`keep`, `freeze`, `thaw`)")


@dataclass
class KVPolicy:
    """Base class of every method. Subclasses are dataclasses registered with `@register`.

    Class attributes declare what the policy needs, so the engine computes nothing else:
    `attn_rows` (attention rows of the last w queries; 0 = none, ALL_ROWS = every query),
    `token_state` (names of per-token float tensors the cache should keep for the policy),
    `uses_budget` (False for methods driven by thresholds rather than a token budget), `evicts` and
    `uniform_layers` (whether all layers hold equally many tokens: `rerotate` needs it), `schedules` (the
    SCHEDULES the method is defined for; `default_schedule` when the run names none), `observes` (True:
    `step` runs at every forward, so per-token scores accumulate, even where the schedule applies nothing) and
    `bounded` (False for a budgeted method that approaches its budget gradually; tests/test_method_contract.py).
    Every method takes `budget`, `schedule` and `decode_interval` (with schedule `decode`, decisions apply at every
    k-th decode step, evicting in blocks as kvpress's DecodingPress does: between them the cache holds up to k − 1
    tokens over its budget, which its peak KV shows).

    That is all every method may use. What one method needs beyond it is an opt-in capability below (`Observes`,
    `ActsBeforeStep`, `ReadsQueries`, `RollsBack`, `Reconstructs`): a class that does not inherit one is never asked
    for it.
    """

    name: ClassVar[str] = ""
    attn_rows: ClassVar[int] = 0
    token_state: ClassVar[tuple[str, ...]] = ()
    uses_budget: ClassVar[bool] = True
    evicts: ClassVar[bool] = True  # False: the cache never loses a token (full), position modes do not apply
    passive: ClassVar[bool] = False  # True: never changes the cache, so the engine does not even call `step`
    uniform_layers: ClassVar[bool] = True  # every layer holds the same number of tokens (rerotate needs it)
    schedules: ClassVar[tuple[str, ...]] = SCHEDULES
    default_schedule: ClassVar[str] = "decode"
    observes: ClassVar[bool] = False
    bounded: ClassVar[bool] = True  # a budgeted method that holds at most its capacity once a decision applies
    budget: Budget | None = None
    schedule: str = ""  # one of `schedules`; empty: `default_schedule`
    decode_interval: int = param(1, low=1)  # schedule `decode`: decisions apply every this many decode steps

    def __post_init__(self) -> None:
        if self.budget is not None and not isinstance(self.budget, Budget):
            self.budget = Budget.parse(self.budget)
        for f in dataclasses.fields(self):
            allowed = parameter_range(f) if f.init else None
            value = getattr(self, f.name)
            if allowed is not None and not allowed.admits(value):
                raise ValueError(f"method {self.name!r}: {f.name}={value!r} is out of range: it must be {allowed}")
        self.schedule = self.schedule or self.default_schedule
        if self.schedule not in self.schedules:
            raise ValueError(
                f"method {self.name!r} has no schedule {self.schedule!r}; its schedules: {', '.join(self.schedules)} "
                "(prompt: once after the prompt, chunk: after every prefill chunk, decode: also while decoding)")
        if self.decode_interval != 1 and (not self.evicts or self.schedule != "decode"):
            raise ValueError(f"method {self.name!r}: decode_interval={self.decode_interval} spaces the decisions of "
                             "the decode schedule (evicting in blocks); this run " + (
                                 "evicts nothing" if not self.evicts else f"has schedule {self.schedule!r}"))

    def compresses(self, phase: Phase, last_chunk: bool) -> bool:
        """Whether the cache applies this step's decision under the run's schedule. A question fed after its
        context (`QUERY`) is not a prompt: only `decode` compresses it, as it compresses the answer."""
        if phase == Phase.COMPRESS:
            return True
        if phase == Phase.PREFILL:
            return last_chunk or self.schedule != "prompt"
        return phase != Phase.RECONSTRUCT and self.schedule == "decode"

    def capacity(self, seen: int) -> int:
        if self.budget is None:
            raise ValueError(f"method {self.name!r} needs a budget (e.g. --budget 256)")
        return self.budget.capacity(seen)

    def wants_attention(self, phase: Phase, last_chunk: bool) -> int:
        """Query rows of attention this step needs (0 = none): none where `step` does not run."""
        return self.attn_rows if self.observes or self.compresses(phase, last_chunk) else 0

    def step(self, view: LayerView) -> Decision | None:
        """Return what to do with this layer's tokens, or None to leave the cache as it is."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget sequence-level state before a new sequence (per-token state lives in the cache)."""

    def report(self) -> dict[str, Any]:
        """Sequence-level counters to put in the run record (e.g. recovery events)."""
        return {}

    def config(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["budget"] = self.budget.to_json() if self.budget is not None else None
        return out


class Observes:
    """Capability: engine signals after each forward (ASR-KF-EGR's next-token entropy)."""

    signals: ClassVar[tuple[str, ...]] = ()  # e.g. "entropy" of the next-token distribution

    def observe(self, signals: dict[str, Any]) -> None:
        """Those named in `signals`, plus "step" (the next step's index) and "phase"."""
        raise NotImplementedError


class ActsBeforeStep:
    """Capability: decisions applied before a forward, so that forward already attends what they changed (a
    recovery's thaws)."""

    def acts_before_step(self, step: int, phase: Phase) -> bool:
        """Whether `before_step` has something to apply before forward `step` of `phase` (asked once per step)."""
        raise NotImplementedError

    def before_step(self, view: LayerView) -> Decision | None:
        """The decision for one layer; `view.attn` is None. Called only when `acts_before_step()`."""
        raise NotImplementedError


class ReadsQueries:
    """Capability: before a layer's attention, the step's queries scored against the frozen keys (`view.frozen_attn`)
    and a decision (thaws) applied before they attend, so they see what it restores."""

    @property
    def reads_queries(self) -> bool:
        """Whether this instance uses it (a parameter may turn it off): `on_queries` then runs in every layer that
        has frozen tokens."""
        return True

    def on_queries(self, view: LayerView) -> Decision | None:
        raise NotImplementedError


class RollsBack:
    """Capability: undo the last generated tokens and generate them again (ASR-KF-EGR's level 4)."""

    def take_rollback(self) -> int:
        """After a decode step: how many of the last generated tokens to undo (`Session.rollback`; 0: none). Read
        once per step by the decode loop, so a request is consumed."""
        raise NotImplementedError

    def rolled_back(self, tokens: int) -> None:
        """Sequence-level state after the engine undid the last `tokens` tokens (per-token state went with them)."""
        raise NotImplementedError

    @property
    def rollback_reserve(self) -> int:
        """Positions each sliding layer keeps beyond its window (masked, counted as active) so that a rollback of up
        to this many tokens stays exact."""
        raise NotImplementedError


class AcrossLayers:
    """Capability: at a decode step, one `step` for every layer at once, after the forward, instead of one per layer
    after its attention (a step's decisions never change its later layers, so the kept sets are the same; the host
    work of a decision is paid once instead of per layer). The view then carries a leading layer axis on
    `positions`, `state` ([L, B, K, n]) and `attn` ([L, B, K, G, w, n]), has no `keys`, `values` or `layer_idx`
    (None), and the decision's `keep` or `evict` carries it too. So a method opts in only if its `step` reads
    nothing else and reduces over trailing axes only (the `selection` helpers do); the contract test holds every
    method that does to the kept sets and state of the per-layer steps. The cost: every layer holds its decode token
    until the last layer's attention, so the active KV within a step peaks up to one row per layer higher."""


class Reconstructs:
    """Capability: after a prompt, a context-reconstruction pass whose attention scores the context (KVzip)."""

    reconstruction_prompt: ClassVar[str]


def reads_queries(policy: KVPolicy) -> bool:
    return isinstance(policy, ReadsQueries) and policy.reads_queries


def rollback_reserve(policy: KVPolicy) -> int:
    return policy.rollback_reserve if isinstance(policy, RollsBack) else 0


class ScorerPolicy(KVPolicy):
    """A budgeted method that only scores tokens (kvpress's scorer/base split): over the layer's capacity, each row
    keeps the tokens `protected` returns plus the highest-scoring others up to the capacity. A subclass writes
    `score` (and `protected` where it keeps some tokens whatever their score); it never selects."""

    def score(self, view: LayerView) -> torch.Tensor | None:
        """[B, K, n] (or [B, 1, n]: one set per layer) scores of the active tokens, higher kept; None: nothing to
        decide this step. Called at every step the method runs, so running scores can accumulate."""
        raise NotImplementedError

    def protected(self, view: LayerView, capacity: int) -> tuple[torch.Tensor, int] | None:
        """Tokens kept whatever their score, and how many of the capacity they take; None: none."""
        return None

    def step(self, view: LayerView) -> Decision | None:
        score = self.score(view)
        cap = self.capacity(view.full_tokens)
        if score is None or view.n <= cap:
            return None
        kept = self.protected(view, cap)
        if kept is None:
            return keep_top(score, cap)
        mask, taken = kept
        return keep_top(score, cap - taken, mask, taken)


def keep_top(score: torch.Tensor, k: int, protected: torch.Tensor | None = None, taken: int = 0) -> Decision:
    """The decision that keeps, in each row, the `protected` tokens (`taken` of them) and the k highest-scoring
    others. A decode step evicts a few: where `bottom_k` finds them unambiguous the decision names them
    (`Decision.evict`), else it is the mask; the kept set is the same either way."""
    evicted = score.shape[-1] - taken - k
    if 0 < evicted <= FEW_EVICTED:
        lowest = bottom_k(score, evicted, exclude=protected, excluded=taken)
        if lowest is not None:
            return Decision(evict=lowest)
    keep = top_k(score, k, exclude=protected)
    return Decision(keep=keep if protected is None else protected | keep)


_REGISTRY: dict[str, type[KVPolicy]] = {}


def register(name: str) -> Callable[[type[KVPolicy]], type[KVPolicy]]:
    """Class decorator: make a policy resolvable by name (`--methods NAME`, `method=NAME`)."""

    def wrap(cls: type[KVPolicy]) -> type[KVPolicy]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    import kvbench.methods  # noqa: F401  (registers the built-in methods)

    return sorted(_REGISTRY)


def policy_class(name: str) -> type[KVPolicy]:
    known = available()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return _REGISTRY[name]


def parameters(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(policy_class(name)) if f.init}


def make_policy(name: str, budget: Budget | str | int | None = None, **params: Any) -> KVPolicy:
    """Build a registered policy, checking parameter names and coercing string values."""
    cls = policy_class(name)
    fields = parameters(name)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        allowed = ", ".join(f for f in sorted(fields) if f != "budget") or "(none)"
        raise ValueError(f"method {name!r} has no parameter {', '.join(unknown)}; its parameters: {allowed}")
    kwargs = {k: _coerce(name, k, v, fields[k]) for k, v in params.items()}
    if budget is not None:
        kwargs["budget"] = budget if isinstance(budget, Budget) else Budget.parse(budget)
    return cls(**kwargs)


def _coerce(method: str, key: str, value: Any, f: dataclasses.Field) -> Any:
    """A parameter value from the command line (a string) or from lm-eval's model args (already a number or a
    bool), as the field's type; anything else is refused by name, never passed through."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if not isinstance(value, str):
        ok = {"bool": isinstance(value, bool) or value in (0, 1),
              "int": not isinstance(value, bool) and isinstance(value, int | float) and float(value).is_integer(),
              "float": not isinstance(value, bool) and isinstance(value, int | float)}.get(kind.split(" ")[0], True)
        if not ok:
            raise ValueError(f"{method}: parameter {key}={value!r} is not a valid {kind}")
        return {"bool": bool, "int": int, "float": float}.get(kind.split(" ")[0], lambda v: v)(value)
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise ValueError(f"{method}: parameter {key}={value!r} is not a valid {kind}") from None
    return value
