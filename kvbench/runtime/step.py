"""The step driver: the one owner of when a policy runs during a forward pass.

A forward of one sequence goes: `begin` (the new tokens' positions, the phase, the schedule's answer for this step,
and the decisions of a method that acts before the step), then per layer inside the attention function
`before_attention` (a method that reads queries may thaw frozen tokens for them) and `after_attention` (a sliding
layer's expiry, then the policy's `step` and its decision applied), then `end` (compaction and accounting). The
cache only stores and counts; the policy only decides; this module calls one on behalf of the other. The attention
function receives a `SequenceStep` or a `BatchStep` (several sequences in one forward, each over its own cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbench.kv.cache import PolicyCache
from kvbench.kv.layer import PolicyLayer
from kvbench.policy import AcrossLayers, ActsBeforeStep, Decision, KVPolicy, LayerView, Phase, reads_queries
from kvbench.runtime.architectures import UnsupportedModel

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`score(frozen_keys, frozen_positions)`: the step's queries' probabilities over frozen tokens (`frozen_attn`)."""


class SequenceStep:
    """Drives `policy` over `cache` for one sequence, forward after forward."""

    def __init__(self, policy: KVPolicy, cache: PolicyCache) -> None:
        self.policy, self.cache = policy, cache
        self.phase = Phase.PREFILL
        self.last_chunk = False
        self.attn_rows = 0  # attention rows the policy wants from this forward (the attention function computes them)
        self.applying = True  # the schedule lets this forward's decisions take effect
        self.decodes = 0  # decode forwards so far: the schedule's `decode_interval` counts them
        self.attended = 0  # layers whose attention ran in this forward
        self.reads_queries = reads_queries(policy)
        self._acts_before = isinstance(policy, ActsBeforeStep)
        self._runs = not policy.passive
        self._across = isinstance(policy, AcrossLayers)
        self._held: list[torch.Tensor | None] = []  # a decode step's attention rows per layer, for `_decide_across`

    @property
    def steps(self) -> int:
        """Forwards completed (prefill chunks, decode steps, questions, reconstruction chunks)."""
        return self.cache.ledger.steps

    def begin(self, positions: torch.Tensor, phase: Phase, last_chunk: bool = True,
              rotations: torch.Tensor | None = None) -> None:
        """`positions`: the new tokens' true positions ([1, q]); `phase`: what this forward does (a question fed
        after its compressed context is `QUERY`: not a prompt a one-shot method compresses again); `rotations`:
        the positions the model rotates them at (in-cache positions under `rerotate` and `naive`)."""
        self.cache.expect(positions, rotations)
        self.attended = 0
        self._held = []  # what a forward that raised left undecided is not this one's
        self.phase, self.last_chunk = phase, last_chunk
        if phase == Phase.DECODE:
            self.decodes += 1
        due = phase != Phase.DECODE or self.decodes % self.policy.decode_interval == 0  # `decode_interval`
        self.attn_rows = self.policy.wants_attention(phase, last_chunk) if due or self.policy.observes else 0
        self.applying = due and self.policy.compresses(phase, last_chunk)
        if self._acts_before and self.policy.acts_before_step(self.steps, phase):
            with self.cache.ledger.policy_time(phase):
                for layer in self.cache.layers:
                    if layer.is_initialized:
                        self._decide(layer, layer.view(None, self.steps, phase), self.policy.before_step)

    def before_attention(self, layer_idx: int, score: Scorer) -> bool:
        """Before a layer's attention, for a policy that reads queries: its `on_queries` decision (thaws) with the
        frozen tokens scored by `score`. Whether the active rows changed. The frozen keys read are counted
        (`frozen_scored`) and the work timed with the policy."""
        layer = self.cache.layers[layer_idx]
        if not layer.frozen.n:
            return False
        with self.cache.ledger.policy_time(self.phase):
            view = layer.view(None, self.steps, self.phase)
            self.cache.ledger.frozen_scored += layer.frozen.n
            view.frozen_attn = score(layer.frozen.keys().to(layer.device), view.frozen_positions.to(layer.device))
            return self._decide(layer, view, self.policy.on_queries) is not None

    def after_attention(self, layer_idx: int, attn: torch.Tensor | None) -> None:
        """Drop what left a sliding layer's window (not in a reconstruction pass, whose scratch tokens leave again),
        then the policy's step on the layer, its decision applied where the schedule lets it act. Timed by phase
        (`policy_seconds`): the bookkeeping a method adds to `full`'s step."""
        self.attended += 1
        layer = self.cache.layers[layer_idx]
        if layer.window is not None and self.phase != Phase.RECONSTRUCT:
            attn = layer.expire(attn)
        if not self._runs or not (self.applying or self.policy.observes):
            return
        if self._across and self.phase == Phase.DECODE:
            self._held.append(attn)  # decided with every other layer's at the end of the forward
            return
        with self.cache.ledger.policy_time(self.phase):
            self._decide(layer, layer.view(attn, self.steps, self.phase), self.policy.step, self.applying)

    def _decide_across(self) -> None:
        """`AcrossLayers`: one `step` for every layer of a decode forward, each layer's part of its decision applied;
        where the layers cannot share a view (`PolicyCache.stacked_view`), one step per layer as usual."""
        held, self._held = self._held, []
        with self.cache.ledger.policy_time(self.phase):
            same = all(a is None for a in held) or all(a is not None and a.shape == held[0].shape for a in held)
            view = self.cache.stacked_view(torch.stack(held) if same and held[0] is not None else None, self.steps,
                                           self.phase) if same and len(held) == len(self.cache.layers) else None
            if view is None:
                for layer, attn in zip(self.cache.layers, held, strict=True):
                    self._decide(layer, layer.view(attn, self.steps, self.phase), self.policy.step, self.applying)
                return
            decision = self.policy.step(view)
            if self.policy.token_state:
                self.cache.store_stacked_state(view)
            if decision is None or not self.applying:
                return
            if decision.freeze is not None or decision.thaw is not None:
                raise ValueError(f"method {self.policy.name!r} decides across layers, which evicts only; it froze or "
                                 "thawed")
            self.cache.evict_stacked(decision)

    def _decide(self, layer: PolicyLayer, view: LayerView, decide: Callable[[LayerView], Decision | None],
                apply: bool = True) -> Decision | None:
        decision = decide(view)
        if self.policy.token_state:
            layer.store_state(view)
        if decision is not None and apply:
            layer.apply(decision)
        return decision

    def check_attended(self, implementation: str) -> None:
        """Every layer's attention must have run through kvbench's function in this forward (else the policy never
        saw those layers and the cache would not hold what the model attended)."""
        layers = len(self.cache.layers)
        if self.attended != layers:
            raise UnsupportedModel(
                f"only {self.attended} of {layers} layers ran the kvbench attention function in this forward: the "
                f"model's attention (implementation {implementation!r}) bypasses transformers' attention interface, "
                "so kvbench cannot compress it")

    def end(self) -> None:
        """At the end of a prompt the cache gives back what prefill chunks reserved; at other steps only clearly idle
        space, so a cache whose size swings (freeze and thaw) does not reallocate every step. A decode step's
        decisions across layers are taken first."""
        if self._held:
            self._decide_across()
        self.cache.step_ended(settle=self.phase != Phase.DECODE and self.last_chunk)

    def compress(self) -> None:
        """After a reconstruction pass: one policy step per layer with the completed scores (no attention)."""
        self.phase, self.last_chunk, self.applying = Phase.COMPRESS, False, True
        for i in range(len(self.cache.layers)):
            self.after_attention(i, None)
        self.end()
        self.phase = Phase.PREFILL


class BatchStep:
    """One decode forward over several sequences, each with its own driver and cache."""

    def __init__(self, sequences: list[SequenceStep]) -> None:
        if not sequences:
            raise ValueError("a batch needs at least one sequence")
        self.sequences = sequences

    def begin(self, positions: torch.Tensor, rotations: torch.Tensor) -> None:
        """`positions` / `rotations`: [B, 1], each sequence's true position and the one it is rotated at."""
        for b, seq in enumerate(self.sequences):
            seq.begin(positions[b : b + 1], Phase.DECODE, last_chunk=True, rotations=rotations[b : b + 1])

    def end(self, implementation: str) -> None:
        for seq in self.sequences:
            seq.check_attended(implementation)
            seq.end()
