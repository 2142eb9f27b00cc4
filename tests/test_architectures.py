"""The supported-architecture matrix: on a tiny random model of each architecture, `full` through the engine
is transformers itself (greedy tokens, logits within 1e-4, KV bytes of transformers' own cache) past the
sliding window, through chunked prefill, decode, batches and the lm-eval scoring path; compressing methods
keep their invariants there; everything else is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import tiny
from kvbench.policy import make_policy
from kvbench.runtime import architectures
from kvbench.runtime.architectures import UnsupportedModel
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec

ARCHS = sorted(tiny.CONFIGS)
PROMPT, NEW, CHUNK = 50, 10, 16  # the prompt spans three windows and four prefill chunks


def test_the_matrix_covers_every_supported_architecture():
    assert set(ARCHS) == set(architectures.SUPPORTED)


@pytest.fixture(scope="module")
def tokenizer():
    from kvbench.runtime import models

    return models.load_tokenizer()


def prompt(seed: int, n: int = PROMPT) -> list[int]:
    return torch.randint(10, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_generate(model, ids: list[int], new: int):
    return model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_through_the_engine_is_transformers_past_the_window(arch, tokenizer):
    ref = tiny.build(arch, tiny.reference_attention(arch))
    engine = Engine(tiny.build(arch, tiny.reference_attention(arch)), tokenizer, prefill_chunk=CHUNK)
    ids = prompt(1)
    ours = engine.generate(ids, make_policy("full"), NEW, return_logits=True, ignore_eos=True)
    theirs = reference_generate(ref, ids, NEW)
    assert ours.tokens == theirs.sequences[0, PROMPT:].tolist()
    for mine, logits in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(mine, logits[0].float(), atol=1e-4, rtol=0)
    # the bytes transformers' own cache holds (sliding layers: their window's last w - 1 tokens)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in theirs.past_key_values.layers)
    assert ours.cache.active_bytes == ours.cache.full_bytes == held and ours.cache.kv_compression == 0
    if engine.layout.sliding:
        assert sum(ours.cache.expired_tokens) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decode_equals_each_sequence_alone(arch, tokenizer):
    engine = Engine(tiny.build(arch, "sdpa" if arch != "gemma2" else "eager"), tokenizer, prefill_chunk=CHUNK)
    prompts = [prompt(2), prompt(3, 37)]
    for method, budget in (("full", None), ("h2o", 12)):
        policy = make_policy(method, budget)
        alone = [engine.generate(p, policy, NEW, ignore_eos=True) for p in prompts]
        together = generate_batch(engine, prompts, policy, NEW, ignore_eos=True)
        for a, b in zip(alone, together, strict=True):
            assert b.tokens == a.tokens
            assert b.cache.active_tokens == a.cache.active_tokens and b.cache.expired_tokens == a.cache.expired_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_eval_loglikelihood_of_full_is_transformers_one_pass_score(arch, tokenizer):
    from kvbench.lmeval.adapter import KVBenchLM

    model = tiny.build(arch, tiny.reference_attention(arch))
    ref = tiny.build(arch, tiny.reference_attention(arch))
    context, continuation = prompt(4, 45), prompt(5, 20)
    lm = KVBenchLM.from_engine(Engine(model, tokenizer, prefill_chunk=CHUNK), RunSpec.build("full"), progress=False)
    (score, greedy), = lm._loglikelihood_tokens([(("", ""), context, continuation)])
    with torch.no_grad():
        logits = ref(torch.tensor([context + continuation])).logits[0].float()
    logp = logits[len(context) - 1 : -1].log_softmax(-1)
    expected = float(logp.gather(-1, torch.tensor(continuation)[:, None]).sum())
    assert score == pytest.approx(expected, abs=1e-3, rel=1e-5)
    assert greedy == bool((logp.argmax(-1) == torch.tensor(continuation)).all())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,budget,params", [("h2o", 12, {}), ("asrkf", None, {"window": 4})])
def test_compressing_methods_keep_their_invariants(arch, method, budget, params, tokenizer):
    """Budget per layer (H2O; a sliding layer's window bounds it too), every token active, frozen, evicted or
    expired exactly once, nothing frozen-and-lost (ASR-KF-EGR evicts nothing), and the cache compressed."""
    engine = Engine(tiny.build(arch, "sdpa" if arch != "gemma2" else "eager"), tokenizer, prefill_chunk=CHUNK)
    steps = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            assert layer.active.n + layer.frozen.n + layer.evicted + layer.expired == layer.seen
            if budget is not None:
                assert layer.active.n <= budget
            else:
                assert layer.evicted == 0
            if layer.window is not None and layer.heads_aligned:
                assert int(layer.positions.min()) >= layer.seen - layer.window + 1
                if layer.frozen.n:
                    assert int(layer.frozen.positions().min()) >= layer.seen - layer.window + 1
        steps.append(cache.ledger.steps)

    result = engine.generate(prompt(6), make_policy(method, budget, **params), NEW, ignore_eos=True, on_step=check)
    assert len(steps) == NEW - 1 + (PROMPT + CHUNK - 1) // CHUNK and len(result.tokens) == NEW
    assert result.cache.mean_kv_compression > 0


def test_a_model_loaded_with_sdpa_is_switched_to_the_kvbench_attention_and_compressed(tokenizer):
    model = tiny.build("llama", "sdpa")
    engine = Engine(model, tokenizer, prefill_chunk=CHUNK)
    assert model.config._attn_implementation == "kvbench"
    result = engine.generate(prompt(7), make_policy("streamingllm", 8), NEW, ignore_eos=True)
    assert result.cache.kv_compression > 0.8


def test_attention_that_bypasses_kvbench_is_refused_not_run_as_full(tokenizer):
    model = tiny.build("llama", "sdpa")
    engine = Engine(model, tokenizer, prefill_chunk=CHUNK)
    model.set_attn_implementation("sdpa")  # behind the engine's back
    with pytest.raises(UnsupportedModel, match="only 0 of 3 layers ran the kvbench attention"):
        engine.generate(prompt(8), make_policy("h2o", 8), NEW)


@pytest.mark.parametrize("config,feature", [
    (lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2), "not been verified"),
    (lambda: transformers.T5Config(num_layers=2, d_model=32), "encoder-decoder"),
    (lambda: transformers.DeepseekV3Config(num_hidden_layers=2), "multi-head latent attention"),
    (lambda: transformers.Llama4TextConfig(num_hidden_layers=2), "chunked attention"),
    (lambda: transformers.GptOssConfig(num_hidden_layers=2), "not been verified"),
    (lambda: transformers.Qwen3NextConfig(num_hidden_layers=4), "linear_attention layers"),
])
def test_unsupported_architectures_are_refused_by_name(config, feature):
    with pytest.raises(UnsupportedModel, match=feature) as err:
        architectures.layout(config())
    assert "Supported architectures: Llama (llama)" in str(err.value)


def test_attention_sinks_are_refused_by_the_attention_function():
    from kvbench.runtime.attention import kvbench_attention

    module = torch.nn.Module()
    module.layer_idx = 0
    q = k = v = torch.zeros(1, 2, 3, 4)
    with pytest.raises(UnsupportedModel, match="attention sinks"):
        kvbench_attention(module, q, k, v, None, s_aux=torch.zeros(2))
    module.is_causal = False
    with pytest.raises(UnsupportedModel, match="non-causal"):
        kvbench_attention(module, q, k, v, None)
