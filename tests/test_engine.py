"""The engine on the real bundled model (SmolLM2-135M-Instruct)."""

import pytest
import torch
from needles import MAX_NEW_TOKENS, STOP, needles, score

from kvbench.policy import Phase, make_policy
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import PromptTooLong

pytestmark = pytest.mark.model

PROMPT = "Write a short poem about the sea, then explain what a rhyme is."
LONG = " ".join([PROMPT] * 30)  # about 430 tokens


def test_full_cache_matches_plain_transformers(model_and_tokenizer, engine):
    from transformers import AutoModelForCausalLM

    model, tok = model_and_tokenizer
    ids = encode_chat(engine.tokenizer, PROMPT)
    ours = engine.generate(ids, make_policy("full"), max_new_tokens=24, return_logits=True)
    plain = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32, attn_implementation="sdpa")
    ref = plain.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=sorted(engine.eos_ids))
    ref_tokens = ref.sequences[0, len(ids):].tolist()
    assert ours.tokens == [t for t in ref_tokens if t not in engine.eos_ids]
    assert len(ours.tokens) >= 10
    for mine, theirs in zip(ours.logits, ref.logits, strict=False):
        torch.testing.assert_close(mine, theirs[0].float(), atol=1e-4, rtol=0)


def test_streamingllm_bounds_every_layer_and_keeps_sinks_plus_window(engine):
    budget, chunk = 96, engine.prefill_chunk
    ids = encode_chat(engine.tokenizer, LONG)
    seen_steps = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            assert layer.get_seq_length() <= budget
            pos = sorted(layer.positions[0, 0].tolist())
            assert pos == [0, 1, 2, 3, *range(layer.seen - (budget - 4), layer.seen)]
        seen_steps.append(cache.layers[0].seen)

    result = engine.generate(ids, make_policy("streamingllm", budget), max_new_tokens=8, on_step=check)
    assert len(ids) > 3 * budget and len(seen_steps) >= 4
    token_bytes = result.cache.full_bytes // result.cache.seen_tokens
    per_layer = token_bytes // len(engine.model.model.layers)
    assert result.cache.peak_active_bytes <= (budget * len(engine.model.model.layers) + chunk) * per_layer
    assert result.cache.kv_compression > 0.7


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "full"])
def test_active_plus_evicted_equals_seen_at_every_step(engine, method):
    ids = encode_chat(engine.tokenizer, LONG)
    steps = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            assert layer.get_seq_length() + layer.frozen.n + layer.evicted == layer.seen
        steps.append(cache.layers[0].seen)

    engine.generate(ids, make_policy(method, None if method == "full" else 64), max_new_tokens=6, on_step=check)
    assert steps[-1] == len(ids) + len(steps) - (len(ids) + 127) // 128


def test_h2o_on_the_real_model_keeps_top_accumulated_scores_plus_recent_half(engine):
    """Each head of every layer keeps the budget/2 most recent tokens plus the budget/2 tokens with the
    highest attention accumulated so far, judged on the scores the policy saw at decision time."""
    budget = 64
    policy = make_policy("h2o", budget)
    seen_by_policy = {}
    step = policy.step

    def spy(view):
        decision = step(view)
        if view.layer_idx is None:  # a decode step decided across layers (policy.AcrossLayers): a leading layer axis
            for i, (pos, score) in enumerate(zip(view.positions, view.state["score"], strict=True)):
                seen_by_policy[i] = (pos.clone(), score.clone(), view.seen)
        else:
            seen_by_policy[view.layer_idx] = (view.positions.clone(), view.state["score"].clone(), view.seen)
        return decision

    policy.step = spy
    checked = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            pos, score, seen = seen_by_policy[layer.layer_idx]
            if seen <= budget:
                continue
            for h in range(pos.shape[1]):
                kept = set(layer.positions[0, h].tolist())
                recent = set(range(seen - budget // 2, seen))
                older = [(sc, p) for p, sc in zip(pos[0, h].tolist(), score[0, h].tolist(), strict=True)
                         if p not in recent]
                heavy = {p for _, p in sorted(older, reverse=True)[: budget // 2]}
                assert kept == recent | heavy
            checked.append(layer.layer_idx)

    engine.generate(encode_chat(engine.tokenizer, LONG), policy, max_new_tokens=4, on_step=check)
    assert len(checked) >= 30


def test_prompt_longer_than_context_window_is_refused(engine):
    with pytest.raises(PromptTooLong, match="exceeds the model's context window of 8192"):
        engine.generate(list(range(100, 8300)), make_policy("full"))


def test_full_cache_finds_the_needle_at_1k(engine):
    scores = [score(engine.generate(s.prompt_ids, make_policy("full"), MAX_NEW_TOKENS, STOP).text, s)
              for s in needles(engine.tokenizer)]
    assert sum(scores) / len(scores) >= 0.9


def test_needle_generator_is_deterministic(engine):
    a = needles(engine.tokenizer, (1024, 2048), seed=3)
    b = needles(engine.tokenizer, (1024, 2048), seed=3)
    c = needles(engine.tokenizer, (1024, 2048), seed=4)
    assert a == b
    assert [s.answer for s in a] != [s.answer for s in c]
    assert all(s.answer in engine.tokenizer.decode(s.prompt_ids) for s in a)


def test_asrkf_freezes_and_thaws_without_losing_a_token_on_the_real_model(engine):
    frozen_seen = []

    def check(step):
        cache = step.cache
        for layer in cache.layers:
            assert layer.evicted == 0
            assert layer.active.n + layer.frozen.n == layer.seen
        frozen_seen.append(cache.ledger.frozen_bytes)

    r = engine.generate(encode_chat(engine.tokenizer, LONG), make_policy("asrkf"), max_new_tokens=24, ignore_eos=True,
                        on_step=check)
    assert max(frozen_seen) > 0 and r.cache.thaws > 0 and r.cache.restore.bytes > 0
    assert r.cache.mean_kv_compression > 0.2
    assert len(r.tokens) == 24


def test_asrkf_retrieval_safe_setting_finds_the_needle_where_full_does(engine):
    """heads=max, tau=0.25 (see reports/asrkf): a token any head relies on is not frozen."""
    policies = {"full": lambda: make_policy("full"), "asrkf": lambda: make_policy("asrkf", heads="max", tau=0.25)}
    for s in needles(engine.tokenizer, depths=(0.1, 0.9)):
        answers = {m: engine.generate(s.prompt_ids, make(), MAX_NEW_TOKENS, STOP).text for m, make in policies.items()}
        assert score(answers["full"], s) == 1.0
        assert score(answers["asrkf"], s) == 1.0


@pytest.mark.parametrize("method,budget", [("full", None), ("streamingllm", 64), ("h2o", 64), ("asrkf", None)])
def test_batched_decode_equals_one_sequence_at_a_time(engine, method, budget):
    """Prompts of different lengths decoded together: each sequence keeps its own cache, so tokens, kept
    sets and bytes are those of running it alone (per-sequence lengths, no padding)."""
    samples = needles(engine.tokenizer, (300, 500), depths=(0.2, 0.8))
    prompts = [list(s.prompt_ids) for s in samples] + [encode_chat(engine.tokenizer, "Tell a long story.")]
    assert len({len(p) for p in prompts}) > 1
    policy = make_policy(method, budget)
    alone = [engine.generate(p, policy, 10, STOP) for p in prompts]
    together = generate_batch(engine, prompts, policy, 10, STOP)
    for a, b in zip(alone, together, strict=True):
        assert b.tokens == a.tokens and b.text == a.text and b.stop_reason == a.stop_reason
        assert b.cache.active_tokens == a.cache.active_tokens and b.cache.active_bytes == a.cache.active_bytes
        assert b.cache.frozen_tokens == a.cache.frozen_tokens and b.cache.evicted_tokens == a.cache.evicted_tokens
    if method == "full":  # the path where a finished sequence leaves the batch while others decode on
        assert len({len(r.tokens) for r in together}) > 1 and max(len(r.tokens) for r in together) == 10


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_snapkv_chunk_schedule_bounds_prefill_peak_where_the_default_does_not(engine, method):
    """Default SnapKV judges the prompt once, at its end (peak = whole prompt); schedule chunk compresses
    after each prefill chunk, so no layer ever holds more than its budget plus one chunk."""
    budget, chunk = 64, engine.prefill_chunk
    ids = encode_chat(engine.tokenizer, LONG)
    assert len(ids) > 3 * chunk
    largest = []

    def check(step):
        cache = step.cache
        if step.phase == Phase.PREFILL:  # after each prompt chunk (decode appends without eviction, as in the paper)
            largest.append(max(layer.get_seq_length() for layer in cache.layers))

    bounded = engine.generate(ids, make_policy(method, budget, schedule="chunk"), 4, on_step=check)
    layer_cap = 2 * budget if method == "pyramidkv" else budget  # PyramidKV's first layers get up to 2B
    assert len(largest) >= 3 and max(largest) <= layer_cap  # what stays after a chunk is within the budget
    default = engine.generate(ids, make_policy(method, budget), 4)
    assert bounded.cache.peak_active_bytes <= (layer_cap + chunk) * bounded.cache.full_bytes // len(ids)
    assert default.cache.peak_active_bytes > 2 * bounded.cache.peak_active_bytes


def test_few_row_linear_computes_f_linear_for_batched_steps_and_leaves_other_calls_alone():
    from kvbench.runtime.few_rows import FewRowLinear

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for shape in ((4, 1, 32), (1, 1, 32), (3, 32), (40, 32)):
        x = torch.randn(*shape, generator=g)
        with FewRowLinear():
            out = torch.nn.functional.linear(x, w, b)
        expected = torch.nn.functional.linear(x, w, b)
        assert out.shape == expected.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected)
        if x.shape[:-1].numel() == 1 or x.shape[:-1].numel() > 16:
            assert torch.equal(out, expected)  # one row (GEMV) and large batches keep F.linear's own kernel


def test_batched_step_keeps_the_policies_ops_out_of_the_few_row_linear_hook(engine, monkeypatch):
    """FewRowLinear sees every torch call made while it is active. The batch step's attention and policy work
    runs with torch-function modes off, so a policy that runs ~200 ops per layer (ASR-KF-EGR) adds no hook
    calls over `full`: only the model's own calls reach it."""
    from kvbench.runtime.few_rows import FewRowLinear

    calls = []
    original = FewRowLinear.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(FewRowLinear, "__torch_function__", counting)
    prompts = [encode_chat(engine.tokenizer, text) for text in ("Tell a long story.", "Name three colours.")]
    seen = {}
    for method in ("full", "asrkf"):
        calls.clear()
        generate_batch(engine, prompts, make_policy(method), 4, ignore_eos=True)
        seen[method] = len(calls)
    assert seen["full"] > 0 and seen["asrkf"] == seen["full"]
    assert torch.nn.functional.linear in calls


def test_the_cache_goes_to_transformers_under_the_forwards_own_argument_name(engine):
    """transformers 5.24 renamed `past_key_values` to `cache` and warns on the old name (gone in 5.40)."""
    import inspect
    import warnings

    assert engine.cache_arg in inspect.signature(engine.model.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        engine.generate(encode_chat(engine.tokenizer, "Hello"), make_policy("h2o", 8), 3)


def key_frozen_layers(engine, sample, policy) -> tuple[str, list[int]]:
    """The answer, and after the prompt and each answer step: in how many layers a token of the needle's key
    is frozen."""
    text = engine.tokenizer.decode(sample.prompt_ids)
    enc = engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"] == list(sample.prompt_ids)
    start = text.index(sample.answer)
    key = {i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(sample.answer) and b > start}
    counts = []

    def watch(step):
        cache = step.cache
        if step.phase == Phase.DECODE or step.last_chunk:
            counts.append(sum(bool(layer.frozen.n and set(layer.frozen.positions()[0, 0].tolist()) & key)
                              for layer in cache.layers))

    return engine.generate(sample.prompt_ids, policy, 8, ("\n",), on_step=watch).text, counts


def test_asrkf_needle_keys_are_frozen_every_other_answer_step_and_query_thaw_answers(engine):
    """The failure traced in issue 21, pinned on the 1k needles at depths 0.1, 0.3 and 0.9 (the full cache answers
    every 1k needle): with the defaults the key's tokens leave attention in most layers at every other
    answer step (thawed on time, re-detected with their stale low importance, frozen again) and the answer is
    wrong. Query-driven thaw gives them back to the queries that need them, and the answer is right."""
    layers = len(engine.layout.windows)
    for sample in needles(engine.tokenizer, depths=(0.1, 0.3, 0.9)):
        text, counts = key_frozen_layers(engine, sample, make_policy("asrkf"))
        assert score(text, sample) == 0.0
        assert max(counts) > layers / 2 > min(counts)  # frozen in most layers at some answer steps, not at others
        text, counts = key_frozen_layers(engine, sample, make_policy("asrkf", query_thaw=0.02, thaw_on_prompt=True))
        assert score(text, sample) == 1.0


@pytest.mark.model
def test_the_stop_check_reads_a_bounded_tail_and_stops_where_the_whole_text_would():
    """On random replies of the real tokenizer (ASCII, accents, CJK, newlines), the step at which a stop string is
    first found is the same as when the whole reply is decoded at every step."""
    import random
    from types import SimpleNamespace

    from kvbench.runtime import models
    from kvbench.runtime.decode import Decoding

    tok = models.load_tokenizer()
    session = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok, eos_ids=set()), policy=make_policy("full"))

    def stops_at(reply: list[int], stop: list[str]) -> int | None:
        decoding = Decoding(session, torch.zeros(8), 100, stop)
        for n in range(1, len(reply) + 1):
            decoding.tokens = reply[:n]
            if decoding.done:
                return n
        return None

    pool = [i for text in ("Question: what é is 東京\n\n Answer. The 42 key", " Answer:", "é", "東", "\n")
            for i in tok(text, add_special_tokens=False)["input_ids"]]
    rng = random.Random(0)
    stops = [["\n\n"], ["Question:"], [" Answer"], ["é", "東京"], ["42 key"]]
    found = 0
    for trial in range(300):
        stop = stops[trial % len(stops)]
        reply = [rng.choice(pool) for _ in range(40)]
        whole = next((n for n in range(1, 41) if any(s in tok.decode(reply[:n], skip_special_tokens=True)
                                                          for s in stop)), None)
        assert stops_at(reply, stop) == whole, (stop, reply)
        found += whole is not None
    assert found > 100  # the streams do hit their stop strings


def test_a_full_cache_decode_step_forces_one_host_synchronisation_the_greedy_token():
    """On a GPU each host read of a tensor's value stalls the step: `full`'s step reads only its greedy token (the
    same count on this CPU, where the calls are counted, not felt). A method's own reads show in `make bench`."""
    import inspect

    import tiny
    from kvbench.runtime import models
    from kvbench.runtime.engine import Engine
    from kvbench.runtime.session import Session
    from kvbench.runtime.syncs import HostSyncs

    lines, first = inspect.getsourcelines(Session.decode_step)
    greedy = first + next(i for i, line in enumerate(lines) if "int(logits.argmax())" in line)
    engine = Engine(tiny.build("llama", "sdpa"), models.load_tokenizer(), prefill_chunk=32)
    session = engine.session(make_policy("full"))
    token = int(session.feed(list(range(100, 180))).argmax())
    with HostSyncs() as syncs:
        for _ in range(5):
            token, _, _ = session.decode_step(token)
    assert dict(syncs.sites) == {f"runtime/session.py:{greedy}": 5}
    with HostSyncs() as syncs:
        bool(torch.tensor([1]).any())
    assert syncs.total == 1  # the counter does see a read


@pytest.mark.parametrize("layers", [3, 12])
def test_an_eviction_decided_across_layers_is_read_on_the_host_once_per_step_whatever_the_depth(layers):
    """StreamingLLM decides for every layer at once (`policy.AcrossLayers`); its decision is read on the host once
    for all layers (`PolicyCache.evict_stacked`: the evicted entries found, then listed), not per layer: a decode
    step's host reads are the greedy token and those two, at 3 layers as at 12, and every layer evicts."""
    import transformers

    import tiny
    from kvbench.runtime import models
    from kvbench.runtime.engine import Engine
    from kvbench.runtime.syncs import HostSyncs

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**tiny._COMMON, "num_hidden_layers": layers})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    session = Engine(model, models.load_tokenizer(), prefill_chunk=32).session(make_policy("streamingllm", 40))
    token = int(session.feed(list(range(100, 180))).argmax())
    with HostSyncs() as syncs:
        for _ in range(5):
            token, _, _ = session.decode_step(token)
    by_file: dict[str, int] = {}
    for site, count in syncs.sites.items():
        by_file[site.split(":")[0]] = by_file.get(site.split(":")[0], 0) + count
    assert by_file == {"kv/cache.py": 10, "runtime/session.py": 5}, dict(syncs.sites)
    assert session.cache.stats().active_tokens == [40] * layers


def test_a_model_without_a_chat_template_converses_in_plain_lines(engine):
    """A base model (Gemma-3-270M has no chat template) converses in the plain form `encode_chat` gives its first
    turn: each message a line. The SmolLM2 tokenizer with its template removed stands in for one."""
    import copy
    from types import SimpleNamespace

    from kvbench.runtime.chat import _turn_ids

    tok = copy.deepcopy(engine.tokenizer)
    tok.chat_template = None
    base = SimpleNamespace(tokenizer=tok, eos_ids=engine.eos_ids)
    assert tok.decode(_turn_ids(base, [], "Hi there.", [])) == "Hi there.\n"
    said = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello"}]
    newline = tok("\n", add_special_tokens=False)["input_ids"]  # the reply stopped at a newline it generated
    assert tok.decode(newline + _turn_ids(base, said, "Bye.", newline)) == "\nBye.\n"
    cut = tok("Hello again", add_special_tokens=False)["input_ids"][-1:]  # a reply cut short by its token limit
    assert tok.decode(cut + _turn_ids(base, said, "Bye.", cut)).endswith("again\nBye.\n")
