"""The one inference loop every policy runs through: chunked prefill, then greedy decode.

Positions are passed explicitly (token i of the sequence always gets position i), so nothing relies on
the cache length meaning "tokens seen". The policy runs per layer inside the attention function after
each prefill chunk and each decode step, so the active KV never exceeds budget + one chunk.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil
import torch

from kvbench.kv.accounting import CacheStats
from kvbench.kv.cache import PolicyCache
from kvbench.kv.rope import Rope
from kvbench.policy import KVPolicy, Observes, Phase, Reconstructs, RollsBack
from kvbench.runtime import architectures
from kvbench.runtime.attention import ATTN_IMPLEMENTATION, CACHE_KWARG, backend_for


class PromptTooLong(ValueError):
    pass


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


QUERY_MODES = ("in-prompt", "after", "reuse")
"""Where the question is: inside the compressed prompt; after its context was compressed to completion; or
one of several questions answered from the same compressed context (each from a copy of that state)."""


class Engine:
    """Runs policies on one loaded model. `prefill_chunk` bounds peak KV at budget + chunk.

    The engine owns attention: a supported model (`architectures.SUPPORTED`) loaded with another attention
    implementation is switched to kvbench's (transformers' `set_attn_implementation`), an unsupported one is
    refused, and every forward checks that each layer's attention went through kvbench's function, so a
    policy never runs as a silent `full`."""

    def __init__(self, model, tokenizer, prefill_chunk: int = 512) -> None:
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.layout = architectures.layout(model.config)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise architectures.UnsupportedModel(
                f"{type(model).__name__} does not take transformers' attention interface, so kvbench cannot run it")
        self.model = model
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)

    @property
    def attention_backend(self) -> str:
        return backend_for(self.device, next(self.model.parameters()).dtype)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        total = prompt_tokens + max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise PromptTooLong(
                f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens = {total} exceeds the "
                f"model's context window of {self.max_positions} positions"
            )

    @torch.inference_mode()
    def compressed_context(self, context: Sequence[int], policy: KVPolicy,
                           positions: str = "original") -> tuple[Session, float]:
        """A session holding `context` prefilled and compressed to completion (one-shot methods included), and
        the seconds it took. Questions then go in with `feed(..., query=True)`, positions continuing from the
        context; `fork()` answers several from the same compressed state."""
        if not context:
            raise ValueError("empty context")
        session = self.session(policy, positions)
        _, seconds = session.timed_feed(context)
        return session, seconds

    def session(self, policy: KVPolicy, positions: str = "original",
                on_step: Callable[[PolicyCache], None] | None = None) -> Session:
        return Session(self, policy, positions, on_step)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[int],
        policy: KVPolicy,
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
        on_step: Callable[[PolicyCache], None] | None = None,
        return_logits: bool = False,
        ignore_eos: bool = False,
        positions: str = "original",
        past_window: bool = False,
    ) -> RunResult:
        """Greedy generation for one prompt. `past_window=True` lets prompt + new tokens run beyond the
        model's trained window (the past-window probe measures exactly that); otherwise it is refused."""
        if not input_ids:
            raise ValueError("empty prompt")
        if not past_window:
            self.check_fits(len(input_ids), max_new_tokens)
        session = self.session(policy, positions, on_step)
        logits, prefill_s = session.timed_feed(input_ids)
        reply = session.reply(logits, max_new_tokens, stop, ignore_eos, return_logits)
        return session.result(len(input_ids), prefill_s, reply)

    def finished(self, generated: list[int], max_new_tokens: int, stop: Sequence[str], eos_ids: set[int]) -> bool:
        """After each step: the length reached, eos, or a stop string. A stop string first appears in the text of
        the newest token, so it is looked for in the last tokens that can hold it (a character is at most 4 bytes,
        a token at least one; 2 more so that a character split at the window's start cannot hide it): one bounded
        decode per step, not one of the whole reply."""
        if len(generated) >= max_new_tokens or generated[-1] in eos_ids:
            return True
        if not stop:
            return False
        window = 4 * max(map(len, stop)) + 2
        return _hit_stop(self.tokenizer.decode(generated[-window:], skip_special_tokens=True), stop)

@dataclass
class Reply:
    tokens: list[int]
    text: str
    stop_reason: str
    decode_s: list[float]
    logits: list[torch.Tensor]


def check_positions(layout: architectures.Layout, positions: str, policy: KVPolicy) -> None:
    """`rerotate` numbers every layer's kept tokens alike, which a model whose sliding layers hold other token sets
    than its global ones cannot have: refused (from the config alone, so before the weights load)."""
    if positions == "rerotate" and layout.sliding and policy.evicts:
        raise ValueError(f"positions=rerotate is not supported on {layout.architecture} models with sliding-window "
                         "layers (their layers hold different token sets); use original or naive")


class Session:
    """One sequence on one PolicyCache: prompt chunks and decode steps can alternate (multi-turn)."""

    def __init__(self, engine: Engine, policy: KVPolicy, positions: str,
                 on_step: Callable[[PolicyCache], None] | None) -> None:
        self.engine, self.policy, self.on_step = engine, policy, on_step
        policy.reset()
        model, layout = engine.model, engine.layout
        check_positions(layout, positions, policy)
        rope = Rope.from_model(model) if positions == "rerotate" else None
        self.cache = PolicyCache(policy, len(layout.windows), engine.device, positions, rope, layout.windows)
        self.seen = 0
        self.pending: list[int] = []  # generated tokens not yet fed back (the last one of a reply)
        self.cuda = engine.device.type == "cuda"
        self._proc = psutil.Process()
        self._rss_peak = self._proc.memory_info().rss
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(engine.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.engine.device)

    def memory_peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.engine.device) if self.cuda else self._rss_peak)

    def _forward(self, ids: torch.Tensor, phase: Phase, last: bool, all_logits: bool = False) -> torch.Tensor:
        engine, cache, q = self.engine, self.cache, ids.shape[1]
        pos = torch.arange(self.seen, self.seen + q, device=engine.device)[None]
        rot = cache.next_rotations(pos)
        cache.begin_step(pos, phase, last_chunk=last, rotation_ids=rot)
        out = engine.model(input_ids=ids, position_ids=rot, use_cache=True, logits_to_keep=0 if all_logits else 1,
                           **{engine.cache_arg: cache, CACHE_KWARG: cache})
        self.check_attended()
        cache.end_step()
        self.after_forward(q, out.logits[0, -1])
        return out.logits[0] if all_logits else out.logits[0, -1]

    def check_attended(self) -> None:
        """Every layer's attention must have run through kvbench's function in this forward (else the policy
        never saw those layers and the cache would not hold what the model attended)."""
        layers = len(self.cache.layers)
        if self.cache.attended != layers:
            raise architectures.UnsupportedModel(
                f"only {self.cache.attended} of {layers} layers ran the kvbench attention function in this forward: "
                f"the model's attention (implementation {self.engine.model.config._attn_implementation!r}) bypasses "
                "transformers' attention interface, so kvbench cannot compress it")

    def after_forward(self, q: int, logits: torch.Tensor) -> None:
        """Bookkeeping after `q` tokens went through the model (alone or in a batch); `logits`: the last one's."""
        self.seen += q
        if isinstance(self.policy, Observes):
            self.policy.observe(_signals(self.policy.signals, logits, self.cache.steps, self.cache.phase))
        if self.on_step is not None:
            self.on_step(self.cache)
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
        self.cache.compress()

    @torch.inference_mode()
    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` fed tokens: their K/V rows leave every layer (active or frozen), positions
        continue from where they start, and the policy's `rolled_back` resets what it keeps per sequence.
        Tokens the policy evicted meanwhile stay evicted; the cache's step counter does not go back (a freeze
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
        twin.cache, twin.policy = copy.deepcopy((self.cache, self.policy))
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
        """Greedy decode from `logits` until eos, a stop string or `max_new_tokens`.
        Where the policy asks for it (`take_rollback`), the last generated tokens are undone and generated again:
        their steps stay in the decode time, and at most `max_new_tokens` tokens are regenerated per reply."""
        eos_ids = set() if ignore_eos else self.engine.eos_ids
        token = int(logits.argmax())
        generated, decode_s = [token], []
        kept = [logits.float().cpu()] if return_logits else []
        regenerable = max_new_tokens
        while not self.engine.finished(generated, max_new_tokens, stop, eos_ids):
            token, logits, seconds = self.decode_step(token)
            decode_s.append(seconds)
            asked = self.policy.take_rollback() if isinstance(self.policy, RollsBack) else 0
            back = min(asked, len(generated), regenerable)  # fed tokens of this reply
            if back:
                regenerable -= back
                self.rollback(back)
                del generated[len(generated) - back + 1:]  # keep the first undone token: it is fed again
                del kept[len(generated):]
                token = generated[-1]
                continue
            if return_logits:
                kept.append(logits.float().cpu())
            generated.append(token)
        return self.finish(generated, decode_s, stop, eos_ids, kept)

    @torch.inference_mode()
    def decode_step(self, token: int) -> tuple[int, torch.Tensor, float]:
        """Feed one generated token: the greedy next token, its logits and the seconds the step took."""
        t = time.perf_counter()
        logits = self._forward(torch.tensor([[token]], device=self.engine.device), Phase.DECODE, last=True)
        token = int(logits.argmax())
        self.sync()
        return token, logits, time.perf_counter() - t

    def finish(self, generated: list[int], decode_s: list[float], stop: Sequence[str], eos_ids: set[int],
               logits: list[torch.Tensor] | None = None) -> Reply:
        """The reply for greedily generated tokens: eos dropped, text cut at the first stop string."""
        self.pending = [generated[-1]]
        reason = "length"
        if generated[-1] in eos_ids:
            reason = "eos"
            generated = generated[:-1]
        text, hit = _cut_at_stop(self.engine.tokenizer.decode(generated, skip_special_tokens=True), stop)
        return Reply(generated, text, "stop" if hit else reason, decode_s, logits or [])


def _signals(names: Sequence[str], logits: torch.Tensor, step: int, phase: Phase) -> dict:
    out: dict = {"step": step, "phase": phase}
    if "entropy" in names:
        logp = logits.float().log_softmax(-1)
        out["entropy"] = float(-(logp.exp() * logp).sum())
    return out


def _hit_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
