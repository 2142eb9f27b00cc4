"""What a cache holds and moves, counted in one place: K/V bytes (active, frozen, reserved, with their high-water
marks), token movements (freezes, thaws, rollbacks, frozen keys scored), host <-> device transfers, the policy's
host time by phase, and the per-step sums behind mean compression. The cache and its layers report to one
`Ledger`; `CacheStats` is what a run returns at its end (the ledger's figures plus the layers' token counts)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from kvbench.policy import Phase


@dataclass
class Transfers:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.count += 1
        self.bytes += nbytes
        self.seconds += seconds


class PolicyTime:
    """`with ledger.policy_time(phase):` adds the block's host time to the phase's (a plain class: it runs per layer
    and step, where a generator-based context manager's overhead shows)."""

    __slots__ = ("seconds", "phase", "t0")

    def __init__(self, seconds: dict[str, float], phase: Phase) -> None:
        self.seconds, self.phase = seconds, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.phase] += time.perf_counter() - self.t0


@dataclass
class Ledger:
    """One sequence's running counters, summed over layers. Peaks are taken at every change, so a size reached
    between two steps (a prefill chunk before its eviction) is counted."""

    active_bytes: int = 0
    frozen_bytes: int = 0
    reserved_bytes: int = 0  # device buffers, spare capacity included
    peak_active_bytes: int = 0
    peak_frozen_bytes: int = 0
    peak_reserved_bytes: int = 0
    freezes: int = 0
    thaws: int = 0
    rollbacks: int = 0  # `Session.rollback` calls
    rolled_back_tokens: int = 0
    frozen_scored: int = 0  # frozen keys read to score them against new queries (`SequenceStep.before_attention`)
    offload: Transfers = field(default_factory=Transfers)
    restore: Transfers = field(default_factory=Transfers)
    policy_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(map(str, Phase), 0.0))
    step_active_sum: int = 0  # active bytes at the end of each step, summed (mean compression)
    step_full_sum: int = 0  # what a full cache would have held at the same moments
    steps: int = 0  # forwards counted so far (prefill chunks, decode steps, questions, reconstruction chunks)

    def resized(self, active: int, frozen: int, reserved: int) -> None:
        """A layer's bytes changed by these amounts."""
        self.active_bytes += active
        self.frozen_bytes += frozen
        self.reserved_bytes += reserved
        self.peak_active_bytes = max(self.peak_active_bytes, self.active_bytes)
        self.peak_frozen_bytes = max(self.peak_frozen_bytes, self.frozen_bytes)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)

    def froze(self, tokens: int, copied_bytes: int, seconds: float) -> None:
        self.freezes += tokens
        self.offload.add(copied_bytes, seconds)

    def thawed(self, tokens: int, nbytes: int, seconds: float) -> None:
        self.thaws += tokens
        self.restore.add(nbytes, seconds)

    def rolled_back(self, tokens: int) -> None:
        self.rollbacks += 1
        self.rolled_back_tokens += tokens

    def step_ended(self, full_bytes: int) -> None:
        self.steps += 1
        self.step_active_sum += self.active_bytes
        self.step_full_sum += full_bytes

    def policy_time(self, phase: Phase) -> PolicyTime:
        """Host time of the policy's deciding and applying, by phase: the bookkeeping a method adds to `full`'s
        step, which its smaller attention has to pay for."""
        return PolicyTime(self.policy_seconds, phase)

    def figures(self) -> dict[str, object]:
        """The ledger's part of `CacheStats`, copied (later steps do not change it)."""
        return {"active_bytes": self.active_bytes, "frozen_bytes": self.frozen_bytes,
                "peak_active_bytes": self.peak_active_bytes, "peak_frozen_bytes": self.peak_frozen_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes, "freezes": self.freezes, "thaws": self.thaws,
                "rollbacks": self.rollbacks, "rolled_back_tokens": self.rolled_back_tokens,
                "frozen_scored": self.frozen_scored, "offload": dataclasses.replace(self.offload),
                "restore": dataclasses.replace(self.restore), "policy_seconds": dict(self.policy_seconds),
                "step_active_bytes": self.step_active_sum / max(1, self.steps),
                "step_full_bytes": self.step_full_sum / max(1, self.steps)}


@dataclass
class CacheStats:
    """Counters of one sequence's run, summed over layers unless named per layer."""

    active_bytes: int
    frozen_bytes: int
    frozen_store_bytes: int  # host copies held by the frozen stores (frozen tokens and thawed ones' copies)
    full_bytes: int  # what transformers' own cache would hold now (sliding layers: their window)
    token_bytes: int  # K/V bytes of one token in every layer
    peak_active_bytes: int  # high-water mark of active KV, measured at every append and compaction
    peak_frozen_bytes: int
    peak_reserved_bytes: int  # high-water mark of device buffers, spare capacity included
    seen_tokens: int  # per layer
    active_tokens: list[int]
    frozen_tokens: list[int]
    evicted_tokens: list[int]
    expired_tokens: list[int]  # left a sliding layer's window (dropped as transformers' own cache drops them)
    freezes: int
    thaws: int
    rollbacks: int  # `Session.rollback` calls
    rolled_back_tokens: int  # tokens undone by them (fed again or regenerated afterwards)
    # frozen keys read to score them against new queries (`SequenceStep.before_attention`), summed over layers
    frozen_scored: int
    offload: Transfers
    restore: Transfers
    policy_seconds: dict[str, float]  # host time deciding and applying decisions after attention, by phase

    step_active_bytes: float  # active KV averaged over steps (prefill chunks and decode steps)
    step_full_bytes: float  # what a full cache would have held, averaged over the same steps

    @property
    def kv_compression(self) -> float:
        """1 - active/full at the end of the run."""
        return 1.0 - self.active_bytes / self.full_bytes if self.full_bytes else 0.0

    @property
    def mean_kv_compression(self) -> float:
        """1 - active/full averaged over every step of the run."""
        return 1.0 - self.step_active_bytes / self.step_full_bytes if self.step_full_bytes else 0.0
