"""The decode step where the host decides its cost: a random Llama too small to compute (30 layers, hidden 48, 3 KV
heads of 16, 1 thread), so each step is the per-layer work Python launches, as for a big model on a GPU at batch 1.
Each method decodes 64 steps after a 1,024-token prompt through the kvbench engine; the reference row is
transformers' own forward with its DynamicCache on the same weights. Weights are random: mechanics and cost only,
never a result."""

from __future__ import annotations

import pytest
import torch
import transformers

from kvbench.policy import available, make_policy, policy_class
from kvbench.runtime.engine import Engine
from kvbench.runtime.syncs import HostSyncs

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


def test_transformers(benchmark, prompt):
    transformers_decode(benchmark, prompt)


def transformers_decode(benchmark, prompt: list[int]) -> None:
    model = build("sdpa")
    benchmark.group, benchmark.extra_info["row"] = "decode step", "transformers"

    @torch.inference_mode()
    def prefilled():
        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return (cache, int(out.logits[0, -1].argmax())), {}

    @torch.inference_mode()
    def decode(cache, token):
        for i in range(STEPS):
            pos = torch.tensor([[PROMPT + i]])
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=pos, use_cache=True)
            token = int(out.logits[0, -1].argmax())

    benchmark.pedantic(decode, setup=prefilled, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("method", available())
def test_kvbench(benchmark, engine, prompt, method):
    kvbench_decode(benchmark, engine, prompt, method)


BLOCK = 16
"""The decode interval of the block rows: a method that evicts at every decode step, deciding every 16th instead."""


@pytest.mark.parametrize("method", [m for m in available() if policy_class(m).evicts
                                    and policy_class(m).default_schedule == "decode" and policy_class(m).uses_budget])
def test_kvbench_in_blocks(benchmark, engine, prompt, method):
    kvbench_decode(benchmark, engine, prompt, method, {"decode_interval": BLOCK})


def kvbench_decode(benchmark, engine: Engine, prompt: list[int], method: str, params: dict | None = None) -> None:
    budget = BUDGET if policy_class(method).uses_budget else None
    row = method + "".join(f" {k}={v}" for k, v in (params or {}).items())
    benchmark.group, benchmark.extra_info["row"] = "decode step", row

    @torch.inference_mode()
    def prefilled():
        session = engine.session(make_policy(method, budget, **(params or {})))
        logits = session.feed(prompt)
        return (session, int(logits.argmax())), {}

    def decode(session, token):
        for _ in range(STEPS):
            token, _, _ = session.decode_step(token)

    (session, token), _ = prefilled()
    with HostSyncs() as syncs:
        decode(session, token)
    benchmark.extra_info["host_syncs_per_step"] = syncs.total / STEPS  # what each step would stall a GPU for
    benchmark.pedantic(decode, setup=prefilled, rounds=ROUNDS, warmup_rounds=1)


def test_transformers_again(benchmark, prompt):
    """The reference once more, last: the summary takes the fastest round of both."""
    transformers_decode(benchmark, prompt)
