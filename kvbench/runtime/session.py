"""One sequence on one cache: prompt chunks, decode steps, questions, scoring and rollbacks, each a forward the step
driver (kvbench/runtime/step.py) takes from start to end. Positions are explicit: token i of the sequence always gets
position i, so nothing relies on the cache length meaning "tokens seen"."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
import torch

from kvbench.kv.accounting import CacheStats
from kvbench.kv.cache import PolicyCache
from kvbench.kv.rope import Rope
from kvbench.policy import KVPolicy, Observes, Phase, Reconstructs, RollsBack
from kvbench.runtime import architectures
from kvbench.runtime.attention import STEP_KWARG
from kvbench.runtime.decode import Decoding, Reply, decode
from kvbench.runtime.step import SequenceStep

if TYPE_CHECKING:
    from kvbench.runtime.engine import Engine


@dataclass
class RunResult:
    """One sequence's outcome and measurements."""

    prompt_tokens: int
    tokens: list[int]
    text: str
    stop_reason: str  # "eos", "stop", "length"
    prefill_s: float  # prompt consumed and first token chosen (time to first token)
    decode_s: list[float]  # wall time of every decode step after the first token
    cache: CacheStats
    memory_peak_bytes: int  # allocator peak on CUDA, peak process RSS sampled per step on CPU
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token, if asked for
    policy_report: dict = field(default_factory=dict)
    # a question after its compressed context (`compressed_context`): the context's prefill and compression
    # time, and whether this result paid for it (1) or reused a context compressed for an earlier question (0)
    context_s: float = 0.0
    context_compressions: int = 0


def check_positions(layout: architectures.Layout, positions: str, policy: KVPolicy) -> None:
    """`rerotate` numbers every layer's kept tokens alike, which a model whose sliding layers hold other token sets
    than its global ones cannot have: refused (from the config alone, so before the weights load)."""
    if positions == "rerotate" and layout.sliding and policy.evicts:
        raise ValueError(f"positions=rerotate is not supported on {layout.architecture} models with sliding-window "
                         "layers (their layers hold different token sets); use original or naive")


class Session:
    """One sequence: prompt chunks and decode steps can alternate (multi-turn)."""

    def __init__(self, engine: Engine, policy: KVPolicy, positions: str,
                 on_step: Callable[[SequenceStep], None] | None, kv_quant: str | None = None) -> None:
        self.engine, self.policy, self.on_step = engine, policy, on_step
        policy.reset()
        model, layout = engine.model, engine.layout
        check_positions(layout, positions, policy)
        rope = Rope.from_model(model) if positions == "rerotate" else None
        cache = PolicyCache(policy, len(layout.windows), engine.device, positions, rope, layout.windows, kv_quant)
        self.step = SequenceStep(policy, cache)
        self.seen = 0
        self.pending: list[int] = []  # generated tokens not yet fed back (the last one of a reply)
        self.cuda = engine.device.type == "cuda"
        self._proc = psutil.Process()
        self._rss_peak = self._proc.memory_info().rss
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)

    @property
    def cache(self) -> PolicyCache:
        return self.step.cache

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.engine.device)

    def memory_peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.engine.device) if self.cuda else self._rss_peak)

    def _forward(self, ids: torch.Tensor, phase: Phase, last: bool, all_logits: bool = False) -> torch.Tensor:
        engine, step, q = self.engine, self.step, ids.shape[1]
        pos = torch.arange(self.seen, self.seen + q, device=engine.device)[None]
        rot = self.cache.next_rotations(pos)
        step.begin(pos, phase, last_chunk=last, rotations=rot)
        out = engine.model(input_ids=ids, position_ids=rot, use_cache=True, logits_to_keep=0 if all_logits else 1,
                           **{engine.cache_arg: self.cache, STEP_KWARG: step})
        step.check_attended(engine.model.config._attn_implementation)
        step.end()
        self.after_forward(q, out.logits[0, -1])
        return out.logits[0] if all_logits else out.logits[0, -1]

    def after_forward(self, q: int, logits: torch.Tensor) -> None:
        """Bookkeeping after `q` tokens went through the model (alone or in a batch); `logits`: the last one's."""
        self.seen += q
        if isinstance(self.policy, Observes):
            signals = {"step": self.step.steps, "phase": self.step.phase}
            if "entropy" in self.policy.signals:
                logp = logits.float().log_softmax(-1)
                signals["entropy"] = float(-(logp.exp() * logp).sum())
            self.policy.observe(signals)
        if self.on_step is not None:
            self.on_step(self.step)
        if not self.cuda:  # on CUDA the allocator keeps its own peak
            self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)

    def timed_feed(self, input_ids: Sequence[int], query: bool = False) -> tuple[torch.Tensor, float]:
        """`feed`, and the seconds it took (synchronized): the prefill time of a prompt or a turn."""
        t0 = time.perf_counter()
        logits = self.feed(input_ids, query)
        self.sync()
        return logits, time.perf_counter() - t0

    def result(self, prompt_tokens: int, prefill_s: float, reply: Reply | None = None) -> RunResult:
        """This sequence's RunResult so far; no `reply` for a scoring pass (nothing generated)."""
        reply = reply or Reply([], "", "score", [], [])
        return RunResult(prompt_tokens, reply.tokens, reply.text, reply.stop_reason, prefill_s, reply.decode_s,
                         self.cache.stats(), self.memory_peak(), reply.logits, self.policy.report())

    @torch.inference_mode()
    def feed(self, input_ids: Sequence[int], query: bool = False) -> torch.Tensor:
        """Consume tokens in prefill chunks (the policy runs after each); logits after the last one. `query`: a
        question after its compressed context (no one-shot compression, no reconstruction pass)."""
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.engine.device)
        n, chunk = ids.shape[1], self.engine.prefill_chunk
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            logits = self._forward(ids[:, start:end], Phase.QUERY if query else Phase.PREFILL, last=end == n)
        if isinstance(self.policy, Reconstructs) and not query:
            self._reconstruct(list(input_ids))
        self.pending = []
        return logits

    def _reconstruct(self, context: list[int], span: int = 2048) -> None:
        """KVzip-style scoring pass: for each `span`-token slice of the context, feed the reconstruction
        prompt and the slice as scratch tokens (the policy scores the context with their attention),
        then drop the scratch so the cache and position count are as before."""
        prompt = self.engine.tokenizer(self.policy.reconstruction_prompt, add_special_tokens=False)["input_ids"]
        end, chunk = self.seen, self.engine.prefill_chunk
        for lo in range(0, len(context), span):
            scratch = torch.tensor([prompt + context[lo : lo + span]], device=self.engine.device)
            for start in range(0, scratch.shape[1], chunk):
                self._forward(scratch[:, start : start + chunk], Phase.RECONSTRUCT, last=False)
            self.seen = end
            self.cache.drop_from(end)
        self.step.compress()

    @torch.inference_mode()
    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` fed tokens: their K/V rows leave every layer (active or frozen), positions
        continue from where they start, and the policy's `rolled_back` resets what it keeps per sequence.
        Tokens the policy evicted meanwhile stay evicted; the step counter does not go back (a freeze
        lasts for steps taken, undone ones included)."""
        if not 0 < tokens <= self.seen:
            raise ValueError(f"cannot roll back {tokens} tokens of a sequence of {self.seen}")
        self.cache.roll_back(self.seen - tokens)
        self.seen -= tokens
        if isinstance(self.policy, RollsBack):
            self.policy.rolled_back(tokens)
        self.pending = []

    def fork(self) -> Session:
        """An independent copy of this sequence (cache, policy state, position): each question of `--query reuse`
        starts from the same compressed context, and nothing of one answer reaches the next."""
        twin = copy.copy(self)
        twin.step = copy.deepcopy(self.step)
        twin.policy = twin.step.policy
        twin.pending = list(self.pending)
        return twin

    @torch.inference_mode()
    def score(self, logits: torch.Tensor, continuation: Sequence[int], query: bool = False) -> tuple[float, bool]:
        """Log-probability of `continuation` after the fed tokens (whose last logits are `logits`), and
        whether it is the greedy continuation. The continuation goes through the policy chunk by chunk,
        so every token is scored against the compressed cache."""
        cont = torch.tensor(list(continuation), device=self.engine.device)
        step_logits = [logits[None]]
        chunk = self.engine.prefill_chunk
        for start in range(0, len(cont) - 1, chunk):
            piece = cont[start : min(start + chunk, len(cont) - 1)]
            step_logits.append(self._forward(piece[None], Phase.QUERY if query else Phase.PREFILL, last=True,
                                             all_logits=True))
        logp = torch.cat(step_logits).float().log_softmax(-1)
        total = float(logp.gather(-1, cont[:, None]).sum())
        greedy = bool((logp.argmax(-1) == cont).all())
        self.pending = [int(cont[-1])]
        return total, greedy

    @torch.inference_mode()
    def reply(self, logits: torch.Tensor, max_new_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False,
              return_logits: bool = False) -> Reply:
        """Greedy decode from `logits` until eos, a stop string or `max_new_tokens` (kvbench/runtime/decode.py)."""
        return decode([Decoding(self, logits, max_new_tokens, stop, ignore_eos, return_logits)])[0]

    @torch.inference_mode()
    def decode_step(self, token: int) -> tuple[int, torch.Tensor, float]:
        """Feed one generated token: the greedy next token, its logits and the seconds the step took."""
        t = time.perf_counter()
        logits = self._forward(torch.tensor([[token]], device=self.engine.device), Phase.DECODE, last=True)
        token = int(logits.argmax())
        self.sync()
        return token, logits, time.perf_counter() - t
