"""The engine: one loaded model that every policy runs on, through chunked prefill and then greedy decode.

A `Session` (kvbench/runtime/session.py) is one sequence on one cache; the step driver (kvbench/runtime/step.py) runs
the policy per layer inside the attention function after each prefill chunk and each decode step, so the active KV
never exceeds budget + one chunk; the decode loop is kvbench/runtime/decode.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from kvbench.policy import KVPolicy
from kvbench.runtime import architectures
from kvbench.runtime.attention import ATTN_IMPLEMENTATION, backend_for
from kvbench.runtime.session import RunResult, Session
from kvbench.runtime.step import SequenceStep


class PromptTooLong(ValueError):
    pass


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
    def compressed_context(self, context: Sequence[int], policy: KVPolicy, positions: str = "original",
                           kv_quant: str | None = None) -> tuple[Session, float]:
        """A session holding `context` prefilled and compressed to completion (one-shot methods included), and
        the seconds it took. Questions then go in with `feed(..., query=True)`, positions continuing from the
        context; `fork()` answers several from the same compressed state."""
        if not context:
            raise ValueError("empty context")
        session = self.session(policy, positions, kv_quant=kv_quant)
        _, seconds = session.timed_feed(context)
        return session, seconds

    def session(self, policy: KVPolicy, positions: str = "original",
                on_step: Callable[[SequenceStep], None] | None = None, kv_quant: str | None = None) -> Session:
        """A sequence on a fresh cache; `kv_quant` stores its K/V rows quantized (kvbench/kv/quant.py)."""
        return Session(self, policy, positions, on_step, kv_quant)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[int],
        policy: KVPolicy,
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
        on_step: Callable[[SequenceStep], None] | None = None,
        return_logits: bool = False,
        ignore_eos: bool = False,
        positions: str = "original",
        past_window: bool = False,
        kv_quant: str | None = None,
    ) -> RunResult:
        """Greedy generation for one prompt. `past_window=True` lets prompt + new tokens run beyond the
        model's trained window (the past-window probe measures exactly that); otherwise it is refused."""
        if not input_ids:
            raise ValueError("empty prompt")
        if not past_window:
            self.check_fits(len(input_ids), max_new_tokens)
        session = self.session(policy, positions, on_step, kv_quant)
        logits, prefill_s = session.timed_feed(input_ids)
        reply = session.reply(logits, max_new_tokens, stop, ignore_eos, return_logits)
        return session.result(len(input_ids), prefill_s, reply)
