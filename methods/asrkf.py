"""ASR-KF-EGR: Adaptive Soft Rolling KV Freeze with Entropy-Guided Recovery (arXiv 2512.11221).

Nothing is evicted. A token whose attention stays low is *frozen*: left out of attention and moved
to the off-device store for a number of steps that grows sublinearly with how often it was found
unimportant, then thawed back, byte-exact, at its original position. A spike in next-token entropy
thaws tokens early, escalating from a soft to a window to a full reset.

Choices the paper leaves open (each a parameter):
- importance: mean attention probability a token receives from the last `window` queries, averaged
  over all query heads of the layer (one decision per layer). At a prefill chunk that is the exact
  mean of the chunk's last `window` rows; during decode, one row per step enters an exponential
  moving average with time constant `window` (the W-row mean without storing W rows).
- low importance: importance < tau / |active|, i.e. below tau times a uniform share. The first
  `sinks` tokens and the `window` most recent tokens are never frozen.
- schedule: each detection adds 1 to the token's count c; the freeze lasts d = floor(sqrt(c) / k)
  steps (prefill chunks and decode steps), and only when d >= 1 (k > 1 needs repeated detections).
- recovery: entropy H of the next-token distribution; a spike is H > mean + sigma * std over the
  last `entropy_history` steps (at least `min_history` steps of history). A spike within
  `escalation_gap` steps of the previous one escalates one level: soft (thaw tokens with d > 1) ->
  window (thaw tokens frozen in the last `window` steps) -> full (thaw everything, clear counts) ->
  regenerate (the paper's fourth level, with `regenerate` = r > 0: a full reset, then the engine rolls
  back the last r generated tokens and generates them again on the restored cache; the escalation
  starts over after it). Thaws take effect after the next step's attention.
kvbench's own options, off by default (the defaults above are the paper read as closely as its public
text allows):
- `entropy_floor` > 0: a decode step whose entropy exceeds it is a spike too, without any history (an
  answer of a few tokens is over before `min_history` steps; the prompt's last logits are left out:
  they carry 1-3.5 nats even with the full cache).
- `early_thaw`: recovery thaws land before the next forward, so that forward attends them (level 4's
  always do: the regenerated tokens must see the restored cache).
- `prefill_freeze=false`: no token is frozen while a prompt is read (importance is still tracked).
- `query_thaw` = p > 0, "restore on demand" read literally: before each layer's attention (a prompt chunk, a
  question or a decode step), the frozen keys are scored against the step's queries where they are stored,
  and a frozen token that any query head would give more than p of its attention (one softmax over active
  and frozen keys) is thawed for that very attention. Its importance is raised to that probability, so the
  step's own update does not freeze it again at once. The keys read are counted (`frozen_scored`).
- `thaw_on_prompt`: every frozen token is thawed before each prompt chunk (a new turn or question).
No reference implementation is public; `heads=mean, tau=0.5` and every option above are kvbench's
choices, not the paper's.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvbench.policy import (
    ActsBeforeStep,
    Decision,
    KVPolicy,
    LayerView,
    Observes,
    ReadsQueries,
    RollsBack,
    param,
    register,
)
from kvbench.selection import recent, sinks

LEVELS = ("soft", "window", "full", "regenerate")


@register("asrkf")
@dataclass
class ASRKF(KVPolicy, Observes, ActsBeforeStep, ReadsQueries, RollsBack):
    token_state: ClassVar[tuple[str, ...]] = ("importance", "count", "until")
    signals: ClassVar[tuple[str, ...]] = ("entropy",)
    uses_budget: ClassVar[bool] = False
    uniform_layers: ClassVar[bool] = False
    observes: ClassVar[bool] = True
    schedules: ClassVar[tuple[str, ...]] = ("decode",)  # freezes and thaws are timed in steps
    window: int = param(32, low=1)
    tau: float = param(0.5, low=0, low_open=True)
    k: float = param(1.0, low=0, low_open=True)
    sinks: int = param(4, low=0)
    recovery: bool = True
    entropy_history: int = param(32, low=2)
    sigma: float = param(2.0, low=0)
    escalation_gap: int = param(8, low=0)
    heads: str = param("mean", choices=("mean", "max"))
    min_history: int = param(8, low=2)
    regenerate: int = param(0, low=0)
    entropy_floor: float = param(0.0, low=0)
    early_thaw: bool = False
    prefill_freeze: bool = True
    query_thaw: float = param(0.0, low=0, high=1, high_open=True)
    thaw_on_prompt: bool = False
    _entropies: deque = field(default_factory=deque, init=False, repr=False)
    _level: int = field(default=0, init=False, repr=False)
    _last_spike: int = field(default=-(10**9), init=False, repr=False)
    _pending: tuple[int, int] | None = field(default=None, init=False, repr=False)  # (level, step)
    _events: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _rollback: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_history > self.entropy_history:  # a spike would never have enough history to be seen
            raise ValueError(f"method 'asrkf': min_history={self.min_history} exceeds entropy_history="
                             f"{self.entropy_history}, the history it is taken from")
        self.reset()

    def reset(self) -> None:
        self._entropies = deque(maxlen=self.entropy_history)
        self._level, self._last_spike, self._pending, self._rollback = 0, -(10**9), None, 0
        self._events = dict.fromkeys(LEVELS, 0)

    def wants_attention(self, phase: str, last_chunk: bool) -> int:
        return self.window

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if not k.startswith("_")}

    def report(self) -> dict[str, Any]:
        return {"recoveries": dict(self._events)}

    @property
    def rollback_reserve(self) -> int:
        return self.regenerate

    def _spike(self, h: float, phase: str) -> bool:
        hist = self._entropies
        if len(hist) >= self.min_history and h > statistics.fmean(hist) + self.sigma * statistics.pstdev(hist):
            return True
        return bool(self.entropy_floor) and phase == "decode" and h > self.entropy_floor

    def observe(self, signals: dict[str, Any]) -> None:
        h = signals["entropy"]
        self._rollback = 0
        if self.recovery and self._spike(h, signals["phase"]):
            step = signals["step"]
            top = len(LEVELS) if self.regenerate else len(LEVELS) - 1
            self._level = min(self._level + 1, top) if step - self._last_spike <= self.escalation_gap else 1
            self._last_spike = step
            self._pending = (self._level, step)
            self._events[LEVELS[self._level - 1]] += 1
            if LEVELS[self._level - 1] == "regenerate":
                self._rollback, self._level = self.regenerate, 0
        self._entropies.append(h)

    def take_rollback(self) -> int:
        back, self._rollback = self._rollback, 0
        return back

    def rolled_back(self, tokens: int) -> None:
        for _ in range(min(tokens, len(self._entropies))):  # the undone steps' entropies
            self._entropies.pop()

    def _thaws_before(self, level: int) -> bool:
        return self.early_thaw or LEVELS[level - 1] == "regenerate"

    def acts_before_step(self, step: int, phase: str) -> bool:
        if self.thaw_on_prompt and phase in ("prefill", "query"):
            return True
        return self._pending is not None and self._pending[1] == step and self._thaws_before(self._pending[0])

    def before_step(self, view: LayerView) -> Decision | None:
        if view.frozen_positions is None:
            return None
        if self.thaw_on_prompt and view.phase in ("prefill", "query"):
            return Decision(thaw=torch.ones_like(view.frozen_positions[:, :1], dtype=torch.bool))
        if self._pending is None or self._pending[1] != view.step:
            return None
        return Decision(thaw=self._recovery_thaw(self._pending[0], view))

    @property
    def reads_queries(self) -> bool:
        return self.query_thaw > 0

    def on_queries(self, view: LayerView) -> Decision | None:
        wanted = view.frozen_attn.amax(dim=(1, 2, 3))[:, None]  # [B, 1, m]: the most any query head gives
        hot = wanted > self.query_thaw
        if not bool(hot.any()):
            return None
        importance = view.frozen_state["importance"]
        view.frozen_state["importance"] = torch.where(hot, torch.maximum(importance, wanted.to(importance.dtype)),
                                                      importance)
        return Decision(thaw=hot)

    def _duration(self, count: torch.Tensor) -> torch.Tensor:
        return torch.floor(count.sqrt() / self.k)

    def step(self, view: LayerView) -> Decision | None:
        s, pos = view.state, view.positions[:, :1]  # per-layer decision: one row serves every KV head
        attn = view.attn  # [B, K, G, w, n]; [B, K, G, n] below: mean over the last queries (one row is its own mean)
        rows = attn.squeeze(3) if attn.shape[3] == 1 else attn.mean(dim=3)
        seen_attn = (rows.mean(dim=(1, 2)) if self.heads == "mean" else rows.amax(dim=(1, 2)))[:, None]  # [B, 1, n]
        rate = 1.0 if view.prefill else 1.0 / self.window
        importance = s["importance"][:, :1]
        importance = importance + rate * (seen_attn - importance)
        low = (importance < self.tau / view.n) & ~(sinks(pos, self.sinks) | recent(pos, view.seen, self.window))
        if view.prefill and not self.prefill_freeze:
            low = torch.zeros_like(low)
        count = s["count"][:, :1] + low
        duration = self._duration(count)
        freeze = low & (duration >= 1)
        until = torch.where(freeze, view.step + duration, s["until"][:, :1])
        for name, value in (("importance", importance), ("count", count), ("until", until)):
            s[name].copy_(value)  # in place, into every KV head's copy

        thaw = None
        if view.frozen_positions is not None:
            f = view.frozen_state
            thaw = f["until"][:, :1] <= view.step
            pending = self._pending
            if pending is not None and pending[1] == view.step and not self._thaws_before(pending[0]):
                thaw = thaw | self._recovery_thaw(pending[0], view)
        return Decision(freeze=freeze, thaw=thaw)  # keep=None: nothing is evicted

    def _recovery_thaw(self, level: int, view: LayerView) -> torch.Tensor:
        f = view.frozen_state
        count, until = f["count"][:, :1], f["until"][:, :1]
        duration = self._duration(count)
        if LEVELS[level - 1] == "soft":
            return duration > 1
        if LEVELS[level - 1] == "window":
            return until - duration >= view.step - self.window
        view.state["count"] = torch.zeros_like(view.state["count"])  # full reset: clear every count
        f["count"] = torch.zeros_like(f["count"])
        return torch.ones_like(count, dtype=torch.bool)
