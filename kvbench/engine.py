"""The one inference loop every policy runs through: chunked prefill, then greedy decode.

Positions are passed explicitly (token i of the sequence always gets position i), so nothing relies on
the cache length meaning "tokens seen". The policy runs per layer inside the attention function after
each prefill chunk and each decode step, so the active KV never exceeds budget + one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil
import torch

from kvbench.attention import CACHE_KWARG, backend_for
from kvbench.cache import CacheStats, PolicyCache
from kvbench.policy import KVPolicy


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


class Engine:
    """Runs policies on one loaded model. `prefill_chunk` bounds peak KV at budget + chunk."""

    def __init__(self, model, tokenizer, prefill_chunk: int = 512) -> None:
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.model = model
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

    def encode_chat(self, user: str, assistant_prefix: str = "") -> list[int]:
        """The model's chat format (if it has one) for one user turn, plus an optional answer prefix."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = user + "\n"
        return self.tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"]

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
    ) -> RunResult:
        n = len(input_ids)
        if n == 0:
            raise ValueError("empty prompt")
        self.check_fits(n, max_new_tokens)
        policy.reset()
        cache = PolicyCache(policy, self.model.config.num_hidden_layers, self.device)
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        proc = psutil.Process()
        rss_peak = proc.memory_info().rss
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

        def forward(chunk: torch.Tensor, start: int, prefill: bool, last: bool) -> torch.Tensor:
            pos = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            cache.begin_step(pos, prefill=prefill, last_chunk=last)
            out = self.model(
                input_ids=chunk, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1, **{CACHE_KWARG: cache},
            )
            cache.end_step()
            logits = out.logits[0, -1]
            if policy.signals:
                policy.observe(_signals(policy.signals, logits, cache.steps))
            if on_step is not None:
                on_step(cache)
            return logits

        t0 = time.perf_counter()
        for start in range(0, n, self.prefill_chunk):
            end = min(n, start + self.prefill_chunk)
            logits = forward(ids[:, start:end], start, prefill=True, last=end == n)
            rss_peak = max(rss_peak, proc.memory_info().rss)
        token = int(logits.argmax())
        if cuda:
            torch.cuda.synchronize(self.device)
        prefill_s = time.perf_counter() - t0
        kept_logits = [logits.float().cpu()] if return_logits else []

        generated = [token]
        decode_s: list[float] = []
        reason = "length"
        eos_ids = set() if ignore_eos else self.eos_ids
        for _ in range(max_new_tokens - 1):
            if token in eos_ids:
                reason = "eos"
                break
            if stop and _hit_stop(self.tokenizer.decode(generated, skip_special_tokens=True), stop):
                reason = "stop"
                break
            t = time.perf_counter()
            logits = forward(torch.tensor([[token]], device=self.device), n + len(generated) - 1, False, True)
            token = int(logits.argmax())
            if cuda:
                torch.cuda.synchronize(self.device)
            decode_s.append(time.perf_counter() - t)
            if return_logits:
                kept_logits.append(logits.float().cpu())
            rss_peak = max(rss_peak, proc.memory_info().rss)
            generated.append(token)
        else:
            if token in eos_ids:
                reason = "eos"
        if generated and generated[-1] in eos_ids:
            generated = generated[:-1]
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        text, hit = _cut_at_stop(text, stop)
        if hit:
            reason = "stop"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else rss_peak
        return RunResult(n, generated, text, reason, prefill_s, decode_s, cache.stats(), int(peak), kept_logits,
                         policy.report())


def _signals(names: Sequence[str], logits: torch.Tensor, step: int) -> dict:
    out: dict = {"step": step}
    if "entropy" in names:
        logp = logits.float().log_softmax(-1)
        out["entropy"] = float(-(logp.exp() * logp).sum())
    return out


def _hit_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
