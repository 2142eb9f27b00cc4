"""The decode step where the host decides its cost: a random Llama too small to compute (30 layers, hidden 48, 3 KV
heads of 16, 1 thread), so each step is the per-layer work Python launches, as for a big model on a GPU at batch 1.
Each method decodes 64 steps after a 1,024-token prompt through the kvbench engine, every round right after
transformers' own forward with its DynamicCache decodes the same on the same weights (the round's ratio). Weights
are random: mechanics and cost only, never a result."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import transformers

from kvbench.policy import available, make_policy, policy_class
from kvbench.runtime.engine import Engine
from kvbench.runtime.syncs import DispatchedOps, HostSyncs

PROMPT, STEPS, BUDGET, VOCAB = 1024, 64, 256, 512
CONFIG = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=30, num_attention_heads=3,
              num_key_value_heads=3, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)


class _Tokenizer:
    """What the engine asks of a tokenizer without stop strings (KVzip encodes its reconstruction prompt)."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [b % VOCAB for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def build(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(build("sdpa"), _Tokenizer(), prefill_chunk=512)


ROUNDS = 7


@pytest.fixture(scope="module")
def reference(prompt: list[int]) -> Callable[[], float]:
    """Seconds of transformers' own decode steps on the same weights, timed again before every round of every kvbench
    row: each round's ratio sets it against the reference run just before it, so a host drifting during the run
    (30-50% within one run on a shared machine) moves both sides of a ratio alike."""
    model = build("sdpa")

    def seconds() -> float:
        cache, token = transformers_prefill(model, prompt)
        start = time.perf_counter()
        transformers_steps(model, cache, token)
        return time.perf_counter() - start

    return seconds


@torch.inference_mode()
def transformers_prefill(model: torch.nn.Module, prompt: list[int]) -> tuple[transformers.DynamicCache, int]:
    cache = transformers.DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, int(out.logits[0, -1].argmax())


@torch.inference_mode()
def transformers_steps(model: torch.nn.Module, cache: transformers.DynamicCache, token: int) -> None:
    for i in range(STEPS):
        pos = torch.tensor([[PROMPT + i]])
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=pos, use_cache=True)
        token = int(out.logits[0, -1].argmax())


def test_transformers(benchmark, prompt):
    """The reference's own row: its absolute times in pytest-benchmark's table (its ratio is 1 by definition)."""
    model = build("sdpa")
    benchmark.group, benchmark.extra_info["row"] = "decode step", "transformers"
    cache, token = transformers_prefill(model, prompt)
    with DispatchedOps() as ops:
        transformers_steps(model, cache, token)
    benchmark.extra_info["ops_per_step"] = ops.total / STEPS
    benchmark.pedantic(lambda cache, token: transformers_steps(model, cache, token),
                       setup=lambda: (transformers_prefill(model, prompt), {}), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("method", available())
def test_kvbench(benchmark, engine, prompt, reference, method):
    kvbench_decode(benchmark, engine, prompt, reference, method)


BLOCK = 16
"""The decode interval of the block rows: a method that evicts at every decode step, deciding every 16th instead."""


@pytest.mark.parametrize("method", [m for m in available() if policy_class(m).evicts
                                    and policy_class(m).default_schedule == "decode" and policy_class(m).uses_budget])
def test_kvbench_in_blocks(benchmark, engine, prompt, reference, method):
    kvbench_decode(benchmark, engine, prompt, reference, method, {"decode_interval": BLOCK})


def kvbench_decode(benchmark, engine: Engine, prompt: list[int], reference: Callable[[], float], method: str,
                   params: dict | None = None) -> None:
    """The row's rounds, each after a reference run; `paired_ratios` (extra info): each round's seconds over the
    reference's just before it, the warm-up round left out."""
    budget = BUDGET if policy_class(method).uses_budget else None
    row = method + "".join(f" {k}={v}" for k, v in (params or {}).items())
    benchmark.group, benchmark.extra_info["row"] = "decode step", row
    references: list[float] = []
    rounds: list[float] = []

    @torch.inference_mode()
    def prefilled():
        references.append(reference())
        session = engine.session(make_policy(method, budget, **(params or {})))
        logits = session.feed(prompt)
        return (session, int(logits.argmax())), {}

    def steps(session, token):
        for _ in range(STEPS):
            token, _, _ = session.decode_step(token)

    def decode(session, token):
        start = time.perf_counter()
        steps(session, token)
        rounds.append(time.perf_counter() - start)

    (session, token), _ = prefilled()
    references.clear()
    with HostSyncs() as syncs, DispatchedOps() as ops:
        steps(session, token)
    benchmark.extra_info["host_syncs_per_step"] = syncs.total / STEPS  # what each step would stall a GPU for
    benchmark.extra_info["ops_per_step"] = ops.total / STEPS  # what each step launches
    benchmark.pedantic(decode, setup=prefilled, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["paired_ratios"] = [t / r for r, t in zip(references, rounds, strict=True)][1:]
