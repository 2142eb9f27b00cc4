"""Chat rendering: one user turn in the model's own format, and a multi-turn conversation on one cache (each
turn's tokens are only what takes the transcript to the next turn, so nothing is fed twice)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvbench.policy import KVPolicy

if TYPE_CHECKING:
    from kvbench.runtime.engine import Engine
    from kvbench.runtime.session import RunResult


def encode_chat(tokenizer, user: str, assistant_prefix: str = "") -> list[int]:
    """The model's chat format for one user turn, plus an optional answer prefix. A base model without a chat
    template gets the plain text with its tokenizer's own special tokens (Gemma's BOS), as transformers and
    lm-eval encode it; a rendered template carries its own, as in `apply_chat_template(tokenize=True)`."""
    template = bool(tokenizer.chat_template)
    if template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = user + "\n"
    return tokenizer(text + assistant_prefix, add_special_tokens=not template)["input_ids"]


@torch.inference_mode()
def converse(engine: Engine, turns: Sequence[str], policy: KVPolicy, max_new_tokens: int = 32, stop: Sequence[str] = (),
             positions: str = "original", kv_quant: str | None = None) -> list[RunResult]:
    """A multi-turn conversation on one cache: each user turn is fed through the policy, then answered.
    Positions may run past the model's trained window (that is what such probes measure)."""
    session = engine.session(policy, positions, kv_quant=kv_quant)
    messages: list[dict[str, str]] = []
    results = []
    for turn in turns:
        ids = session.pending + _turn_ids(engine, messages, turn, session.pending)
        messages.append({"role": "user", "content": turn})
        logits, prefill_s = session.timed_feed(ids)
        reply = session.reply(logits, max_new_tokens, stop)
        messages.append({"role": "assistant", "content": reply.text})
        results.append(session.result(len(ids), prefill_s, reply))
    return results

def merge_turns(results: Sequence[RunResult]) -> RunResult:
    """One RunResult for a whole conversation: replies joined by '|', times and tokens pooled."""
    return dataclasses.replace(
        results[-1],
        prompt_tokens=sum(r.prompt_tokens for r in results),
        tokens=[t for r in results for t in r.tokens],
        text="|".join(r.text.replace("|", " ") for r in results),
        prefill_s=sum(r.prefill_s for r in results),
        decode_s=[d for r in results for d in r.decode_s],
        memory_peak_bytes=max(r.memory_peak_bytes for r in results),
    )

def _turn_ids(engine: Engine, messages: list[dict[str, str]], turn: str, pending: list[int]) -> list[int]:
    """Tokens that take a transcript (whose last reply is fed up to `pending`) to the next user turn."""
    if not messages:
        return encode_chat(engine.tokenizer, turn)
    if not engine.tokenizer.chat_template:  # a base model: the plain transcript `encode_chat` began, a line a message
        fed = engine.tokenizer.decode(pending[-1:]) if pending else ""
        return engine.tokenizer(("" if fed.endswith("\n") else "\n") + turn + "\n",
                                add_special_tokens=False)["input_ids"]
    render = engine.tokenizer.apply_chat_template
    before = render(messages, tokenize=False)
    after = render([*messages, {"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("this model's chat template rewrites earlier turns; multi-turn needs a prefix-stable one")
    reply = messages[-1]["content"]
    tail = before[before.rindex(reply) + len(reply):] if reply else before[len(before.rstrip()):]
    fed = engine.tokenizer.decode(pending[-1:]) if pending and pending[-1] in engine.eos_ids else ""
    tail = tail[len(fed):] if fed and tail.startswith(fed) else tail
    return engine.tokenizer(tail + after[len(before):], add_special_tokens=False)["input_ids"]
