"""Quantized K/V rows (kvbench/kv/quant.py): the error within the scheme's bound, the bytes counted equal to codes +
scales + minimums, `full` on quantized rows equal to transformers' own cache holding the same quantized rows, every
cache mechanism (eviction, freezing, sliding layers, batches) on quantized rows, refusals. Tiny random models:
equivalence and mechanics, never reported results."""

import json

import pytest
import torch
import transformers
from transformers import DynamicCache

import tiny
from conftest import Scripted, assert_valid_results, feed, make_cache
from kvbench.cli import main
from kvbench.kv.quant import GROUP, KeyGroups, RowCodec, codec
from kvbench.policy import Decision, make_policy
from kvbench.runtime import models
from kvbench.runtime.batch import generate_batch
from kvbench.runtime.engine import Engine
from kvbench.runtime.runspec import RunSpec

PROMPT = list(range(20, 220))


def samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 3, 40, 64, generator=g) * 30
    flat = torch.full((1, 1, 2, 64), 0.1)  # a constant group: a zero range
    spiky = torch.randn(1, 2, 5, 32, generator=g)
    spiky[..., 3] = 900.0  # one outlier channel, as keys have
    return [wide, flat, spiky, wide.to(torch.bfloat16), wide.to(torch.float16)]


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
def test_decoding_an_encoded_row_errs_by_at_most_half_a_step_of_its_group(scheme):
    base = codec(scheme)
    levels = (1 << base.bits) - 1
    for x in samples():
        c = base.sized(x.shape[-1])
        y = c.decode(c.encode(x), torch.float32)
        bound = c.bound(x)
        assert ((y - x.float()).abs() <= bound).all()
        groups = x.float().reshape(*x.shape[:-1], -1, c.group)
        span = (groups.amax(-1) - groups.amin(-1) + groups.abs().amax(-1) * 2**-9)[..., None]
        assert (bound.reshape(groups.shape) <= span / levels / 2 * (1 + 2**-8) + 1e-3).all()  # the bound is tight
        assert c.decode(c.encode(x), x.dtype).dtype == x.dtype


@pytest.mark.parametrize("scheme", ["quanto4", "quanto2"])
def test_quanto_rows_err_by_at_most_half_a_step_of_their_group_in_the_models_dtype(scheme):
    """transformers' scheme keeps its scale and shift in the model's dtype, so a row decodes to that dtype."""
    c = codec(scheme).sized(64)
    for x in samples():
        if x.shape[-1] % 64:
            continue
        y = c.decode(c.encode(x), x.dtype)
        assert y.dtype == x.dtype and ((y.float() - x.float()).abs() <= c.bound(x).float()).all()


def test_a_row_is_its_codes_then_a_float16_scale_and_minimum_per_group():
    assert GROUP == 32
    assert codec("int4").sized(64).width(64) == 64 * 4 // 8 + 2 * 2 * 2  # two groups of 32 channels
    assert codec("int8").sized(16).width(16) == 16 + 2 * 2  # a head smaller than a group: one group
    assert codec("int2").sized(128).width(128) == 128 * 2 // 8 + 4 * 2 * 2
    with pytest.raises(ValueError, match="do not split into groups of 32 channels"):
        codec("int4").sized(64, 48)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny.build("llama", "sdpa", seed=0), models.load_tokenizer(), prefill_chunk=64)


def row_bytes(engine: Engine, scheme: str | None) -> int:
    """One token's K and V in one layer as stored: [B=1, K heads, width]."""
    cfg = engine.model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    width = codec(scheme).sized(d).width(d) if scheme else d * 4  # float32
    return cfg.num_key_value_heads * 2 * width


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
def test_the_bytes_counted_are_the_stored_rows_and_full_bytes_the_models_dtype(engine, scheme):
    layers = engine.model.config.num_hidden_layers
    r = engine.generate(PROMPT, make_policy("full"), 6, kv_quant=scheme, ignore_eos=True)
    seen = len(PROMPT) + 5  # the last token is never fed
    assert r.cache.active_bytes == seen * layers * row_bytes(engine, scheme)
    assert r.cache.full_bytes == seen * layers * row_bytes(engine, None)
    assert r.cache.kv_compression == pytest.approx(1 - row_bytes(engine, scheme) / row_bytes(engine, None))

    evicting = engine.generate(PROMPT, make_policy("streamingllm", 64), 6, kv_quant=scheme, ignore_eos=True)
    assert evicting.cache.active_tokens == [64] * layers
    assert evicting.cache.active_bytes == 64 * layers * row_bytes(engine, scheme)

    freezing = engine.generate(PROMPT, make_policy("asrkf"), 12, kv_quant=scheme, ignore_eos=True)
    assert sum(freezing.cache.frozen_tokens) > 0 and freezing.cache.thaws > 0  # the store holds quantized rows
    assert freezing.cache.frozen_bytes == sum(freezing.cache.frozen_tokens) * row_bytes(engine, scheme)
    assert freezing.cache.active_bytes == sum(freezing.cache.active_tokens) * row_bytes(engine, scheme)


class FakeQuantCache(DynamicCache):
    """transformers' own cache holding each new K/V row as `codec` stores it (encoded, then decoded)."""

    def __init__(self, row_codec: RowCodec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.row_codec = row_codec

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        c = self.row_codec.sized(key_states.shape[-1], value_states.shape[-1])
        keys, values = (c.decode(c.encode(t), t.dtype) for t in (key_states, value_states))
        return super().update(keys, values, layer_idx, *args, **kwargs)


@torch.inference_mode()
def reference(plain, cache: DynamicCache, cache_arg: str, new: int = 8) -> list[torch.Tensor]:
    """Greedy logits of transformers' forward on `cache`, the prompt fed in the engine's chunks of 64 (a code is a
    rounding: the same K rows must come out of the same matmuls)."""
    for start in range(0, len(PROMPT), 64):
        out = plain(input_ids=torch.tensor([PROMPT[start : start + 64]]), use_cache=True, **{cache_arg: cache})
    logits = []
    for _ in range(new):
        logits.append(out.logits[0, -1])
        out = plain(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_arg: cache})
    return logits


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma3_text: sliding-window layers
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_full_on_quantized_rows_equals_transformers_cache_holding_the_same_rows(arch, scheme):
    ours = Engine(tiny.build(arch, tiny.reference_attention(arch), seed=1), models.load_tokenizer(), prefill_chunk=64)
    plain = tiny.build(arch, tiny.reference_attention(arch), seed=1)
    got = ours.generate(PROMPT, make_policy("full"), 8, return_logits=True, kv_quant=scheme, ignore_eos=True)
    logits = reference(plain, FakeQuantCache(codec(scheme), config=plain.config), ours.cache_arg)
    assert got.tokens == [int(t.argmax()) for t in logits]
    for mine, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    if arch == "gemma3_text":  # its sliding layers hold their window, stored quantized
        window = plain.config.sliding_window
        assert min(got.cache.active_tokens) == window - 1 < max(got.cache.active_tokens)


def test_a_batch_on_quantized_rows_gives_each_sequence_its_own_run(engine):
    prompts = [PROMPT, PROMPT[:150], PROMPT[40:]]
    together = generate_batch(engine, prompts, make_policy("h2o", 64), 6, ignore_eos=True, kv_quant="int4")
    for ids, batched in zip(prompts, together, strict=True):
        alone = engine.generate(ids, make_policy("h2o", 64), 6, ignore_eos=True, kv_quant="int4")
        assert batched.tokens == alone.tokens
        assert batched.cache.active_bytes == alone.cache.active_bytes


def test_an_unknown_scheme_and_rerotated_quantized_keys_are_refused():
    with pytest.raises(ValueError, match="kv_quant='int5' is not a KV quantization scheme; allowed: none, int8"):
        RunSpec.build("full", kv_quant="int5")
    with pytest.raises(ValueError, match="positions=rerotate turns stored keys .* with kv_quant=int4 use original"):
        RunSpec.build("streamingllm", 64, positions="rerotate", kv_quant="int4")
    assert RunSpec.build("full", kv_quant="none").kv_quant is None


def test_compare_sweeps_the_storage_and_shows_it_in_the_records_and_table(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny.build("llama", "sdpa", seed=0).save_pretrained(folder)
    models.load_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    args = ["compare", "--model", str(folder), "--methods", "full,streamingllm", "--budget", "64", "--tasks",
            "needle-1k", "--limit", "1", "--no-progress"]
    assert main([*args, "--kv-quant", "int5", "--out", str(tmp_path / "bad")]) == 2
    assert "kv_quant='int5' is not a KV quantization scheme" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--kv-quant", "none,int4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert_valid_results(results)
    rows = {(r["method"], r.get("kv_quant")): r for r in results["records"]}
    assert set(rows) == {("full", None), ("full", "int4"), ("streamingllm", None), ("streamingllm", "int4")}
    ratio = rows["full", "int4"]["metrics"]["active_kv_bytes"] / rows["full", None]["metrics"]["active_kv_bytes"]
    d = 64 // 4  # the tiny model's head size
    assert ratio == pytest.approx(codec("int4").sized(d).width(d) / (d * 4))
    assert rows["full", "int4"]["config"]["kv_quant"] == "int4"
    table = (out / "leaderboard.md").read_text()
    assert "KV quant" in table and "| int4" in table


class FakeResidualCache(DynamicCache):
    """transformers' own cache (full-precision rows) returning every row but the newest `residual` as `codec`
    stores it: what a cache with a full-precision residual window attends."""

    def __init__(self, row_codec: RowCodec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.row_codec = row_codec

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        c, r = self.row_codec.sized(keys.shape[-1], values.shape[-1]), self.row_codec.residual
        return tuple(torch.cat([c.decode(c.encode(t[:, :, :-r]), t.dtype), t[:, :, -r:]], 2) for t in (keys, values))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_newest_tokens_are_attended_in_full_precision_and_counted(arch):
    """int4r48: the newest 48 tokens of each layer attended from full-precision copies, older ones quantized (a
    prefill chunk of 64 too: its older 16 tokens attend their quantized rows), as transformers' cache holding
    exactly that gives; the copies are counted with the quantized rows."""
    ours = Engine(tiny.build(arch, tiny.reference_attention(arch), seed=2), models.load_tokenizer(), prefill_chunk=64)
    plain = tiny.build(arch, tiny.reference_attention(arch), seed=2)
    got = ours.generate(PROMPT, make_policy("full"), 8, return_logits=True, kv_quant="int4r48", ignore_eos=True)
    logits = reference(plain, FakeResidualCache(codec("int4r48"), config=plain.config), ours.cache_arg)
    assert got.tokens == [int(t.argmax()) for t in logits]
    for mine, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    plain_quantized = ours.generate(PROMPT, make_policy("full"), 8, return_logits=True, kv_quant="int4",
                                    ignore_eos=True)
    assert (got.logits[-1] - plain_quantized.logits[-1]).abs().max() > 1e-3  # the window changes what is attended
    cfg = plain.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    quantized = cfg.num_key_value_heads * 2 * codec("int4").sized(d).width(d)
    full_precision = cfg.num_key_value_heads * 2 * d * 4
    assert got.cache.active_bytes == sum(got.cache.active_tokens) * quantized + 48 * len(
        got.cache.active_tokens) * full_precision


@pytest.mark.parametrize("nbits", [4, 2])
def test_full_on_quanto_rows_gives_transformers_quanto_cache(nbits):
    """quantoB: transformers' own `QuantizedCache(backend="quanto")` (optimum-quanto's quantizer): the prompt
    quantized as it comes, the tokens since the last flush in full precision, a flush every 128 that quantizes the
    whole cache again from its dequantized values. 200 prompt tokens and 160 new cross two flushes; the rows are the
    library's codes, so tokens and logits are transformers' (int4 with a sliding window of 128 differs)."""
    ours = Engine(tiny.wide_llama(3), models.load_tokenizer(), prefill_chunk=64)
    plain = tiny.wide_llama(3)
    scheme = f"quanto{nbits}"
    got = ours.generate(PROMPT, make_policy("full"), 160, return_logits=True, kv_quant=scheme, ignore_eos=True)
    cache = transformers.QuantizedCache(backend="quanto", config=plain.config, nbits=nbits)
    logits = reference(plain, cache, ours.cache_arg, new=160)
    assert got.tokens == [int(t.argmax()) for t in logits]
    for mine, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    windowed = ours.generate(PROMPT, make_policy("full"), 160, return_logits=True, kv_quant=f"int{nbits}r128",
                             ignore_eos=True)
    assert max((a - b).abs().max() for a, b in zip(windowed.logits, logits, strict=True)) > 1e-3

    # stored: every token's codes and its group's float32 scale and shift, and the block since the last flush
    cfg, seen = plain.config, len(PROMPT) + 159  # the last new token is never fed
    held = 8 + 159 - 128  # since the prompt's last flush: its last chunk of 8, the new tokens; one flush at 128
    assert codec(scheme).width(64) == 64 * nbits // 8 + 2 * 4
    row = cfg.num_key_value_heads * 2 * (64 * nbits // 8 + 2 * 4)
    assert got.cache.active_bytes == cfg.num_hidden_layers * (seen * row + held * cfg.num_key_value_heads * 2 * 64 * 4)


@torch.inference_mode()
def test_quanto_rows_hold_transformers_quanto_cache_bit_for_bit_after_its_flushes():
    """After 200 prompt tokens in chunks of 64 and 150 more one at a time (flushes at the third chunk and at the
    120th token), the first layer's stored K/V read back equals what transformers' quanto cache holds (dequantized
    part + residual), bit for bit: the flush quantizes again from dequantized values, which moves some scales by an
    ulp (a difference logits within 1e-4 cannot show). The first layer's K/V depend on the tokens alone; a later
    layer's differ by an ulp where kvbench's attention and SDPA round differently in a decode step."""
    ours = Engine(tiny.wide_llama(4), models.load_tokenizer(), prefill_chunk=64)
    plain = tiny.wide_llama(4)
    fed = PROMPT + list(range(300, 450))
    session = ours.session(make_policy("full"), kv_quant="quanto4")
    session.feed(PROMPT)
    cache = transformers.QuantizedCache(backend="quanto", config=plain.config, nbits=4)
    for start in range(0, len(PROMPT), 64):
        plain(input_ids=torch.tensor([PROMPT[start : start + 64]]), use_cache=True, **{ours.cache_arg: cache})
    for token in fed[len(PROMPT) :]:
        session.feed([token])
        plain(input_ids=torch.tensor([[token]]), use_cache=True, **{ours.cache_arg: cache})
    mine, theirs = session.cache.layers[0], cache.layers[0]
    stored = mine.block.overlay(mine.active.keys(), mine.active.values(), mine.active.positions())
    held = [torch.cat([theirs._dequantize(q), fp], -2) for q, fp in
            ((theirs._quantized_keys, theirs.keys), (theirs._quantized_values, theirs.values))]
    assert mine.block.held == theirs.keys.shape[-2] == 8 + 150 - 128
    assert torch.equal(stored[0], held[0]) and torch.equal(stored[1], held[1])


def test_quanto_rows_are_refused_where_a_group_of_64_would_span_tokens(engine):
    with pytest.raises(ValueError, match="heads have 16: use int4"):
        engine.generate(PROMPT, make_policy("full"), 2, kv_quant="quanto4")


def test_a_rolled_back_position_is_never_read_from_the_copy_a_slot_held_for_it(engine):
    """int4r16, 200 tokens fed and the last 10 rolled back: positions 184..189 still have their full-precision
    copies; the slots of 174..183 held the rolled-back 190..199, so those positions are read quantized, as is
    everything older; tokens fed again take their slots back."""
    session = engine.session(make_policy("full"), kv_quant="int4r16")
    session.feed(PROMPT)
    session.rollback(10)
    layer = session.cache.layers[0]
    pos = layer.active.positions()[0, 0]
    full_precision = (layer.keys != layer.active.keys()).any(-1).any(1)[0]  # per row: read from a copy
    assert sorted(pos[full_precision].tolist()) == list(range(184, 190))
    session.feed([7, 8, 9])
    pos = layer.active.positions()[0, 0]
    full_precision = (layer.keys != layer.active.keys()).any(-1).any(1)[0]
    assert sorted(pos[full_precision].tolist()) == [*range(184, 190), 190, 191, 192]


def test_bench_times_every_method_on_each_storage_against_full_in_the_models_dtype(tmp_path):
    folder = tmp_path / "model"
    tiny.build("llama", "sdpa", seed=0).save_pretrained(folder)
    models.load_tokenizer().save_pretrained(folder)
    assert main(["bench", "--model", str(folder), "--methods", "full,streamingllm", "--contexts", "200",
                 "--new-tokens", "3", "--budget", "64", "--kv-quant", "none,int4", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    doc = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert_valid_results(doc)
    rows = {(r["method"], r.get("kv_quant")): r for r in doc["records"]}
    assert set(rows) == {("full", None), ("full", "int4"), ("streamingllm", None), ("streamingllm", "int4")}
    assert rows["full", None]["decode_vs_full"] == 1.0 and rows["full", "int4"]["decode_vs_full"] > 0
    d = 16
    assert rows["full", "int4"]["active_kv_bytes"] == rows["full", None]["active_kv_bytes"] * codec("int4").sized(
        d).width(d) // (d * 4)
    assert "| full int4 " in (tmp_path / "b" / "bench.md").read_text()


def test_kivi_keys_err_by_at_most_half_a_step_of_their_channel_in_their_group():
    from kvbench.kv.quant import KeyGroups

    for bits in (4, 2):
        for keys in (torch.randn(1, 3, 32, 64) * 5, samples()[2][:, :, :4].repeat(1, 1, 8, 1)):
            groups = KeyGroups(bits)
            decoded = groups.decode(groups.quantize(keys), torch.float32)
            x = keys.float()
            step = (x.amax(2) - x.amin(2)) / ((1 << bits) - 1)  # per channel, over the group's tokens
            slack = 2**-9 * x.abs().amax(2) + 1e-6
            assert ((decoded - x).abs() <= (step / 2 + slack)[:, :, None]).all()
            assert groups.count == 1 and groups.nbytes == 2 * keys.shape[1] * keys.shape[-1] * 2


class FakeKiviCache(DynamicCache):
    """transformers' own cache returning KIVI's reading of its full-precision rows: the newest `residual` tokens as
    they are; older keys quantized per channel over aligned groups of 32 positions, older values per token."""

    def __init__(self, bits: int, residual: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bits, self.residual = bits, residual

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        from kvbench.kv.quant import KeyGroups

        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        cut = max(0, keys.shape[2] - self.residual)
        old = keys[:, :, :cut].clone()
        for start in range(0, cut, 32):
            groups = KeyGroups(self.bits)
            old[:, :, start : start + 32] = groups.decode(groups.quantize(keys[:, :, start : start + 32]),
                                                          keys.dtype)[:, :, : min(32, cut - start)]
        c = RowCodec(self.bits).sized(values.shape[-1])
        return (torch.cat([old, keys[:, :, cut:]], 2),
                torch.cat([c.decode(c.encode(values[:, :, :cut]), values.dtype), values[:, :, cut:]], 2))


@pytest.mark.parametrize("scheme", ["kivi4r48", "kivi2r32"])
def test_kivi_equals_transformers_cache_reading_keys_per_channel_and_values_per_token(scheme):
    ours = Engine(tiny.build("llama", tiny.reference_attention("llama"), seed=3), models.load_tokenizer(),
                  prefill_chunk=64)
    plain = tiny.build("llama", tiny.reference_attention("llama"), seed=3)
    got = ours.generate(PROMPT, make_policy("full"), 8, return_logits=True, kv_quant=scheme, ignore_eos=True)
    row_codec = codec(scheme)
    logits = reference(plain, FakeKiviCache(row_codec.bits, row_codec.residual, config=plain.config), ours.cache_arg)
    assert got.tokens == [int(t.argmax()) for t in logits]
    for mine, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    cfg = plain.config
    d, heads, layers = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    seen = len(PROMPT) + 7
    rows = heads * (d * row_codec.bits // 8 + 4 + row_codec.sized(d).width(d))  # key codes + group, value row
    window = row_codec.residual * heads * 2 * d * 4
    groups = -(-(seen - row_codec.residual) // 32)  # each group's per-channel scale and minimum, float16
    assert got.cache.active_bytes == layers * (seen * rows + window + groups * 2 * heads * d * 2)


def test_kivi_runs_with_eviction_freezing_rollback_sliding_layers_and_batches(engine):
    for policy in (make_policy("h2o", 64), make_policy("asrkf"), make_policy("snapkv", 64)):
        r = engine.generate(PROMPT, policy, 12, kv_quant="kivi4r32", ignore_eos=True)
        assert r.tokens and r.cache.active_bytes < r.cache.full_bytes
    session = engine.session(make_policy("full"), kv_quant="kivi4r32")
    session.feed(PROMPT)
    session.rollback(50)  # positions 150.. go: the groups from 128 on are quantized again when fed again
    assert session.cache.layers[0].key_codec.upto == 150
    session.feed(PROMPT[:60])  # positions 150..209: the window keeps 178.., so the group 150..181 is quantized
    assert session.cache.layers[0].key_codec.upto == 182
    gemma = Engine(tiny.build("gemma3_text", "eager", seed=0), models.load_tokenizer(), prefill_chunk=64)
    g = gemma.generate(PROMPT, make_policy("streamingllm", 96), 8, kv_quant="kivi4r32", ignore_eos=True)
    assert g.tokens and min(g.cache.active_tokens) <= 96
    batch = generate_batch(engine, [PROMPT, PROMPT[:120]], make_policy("h2o", 64), 6, ignore_eos=True,
                           kv_quant="kivi4r32")
    assert batch[1].tokens == engine.generate(PROMPT[:120], make_policy("h2o", 64), 6, ignore_eos=True,
                                              kv_quant="kivi4r32").tokens


def _kivi_run(engine, policy, rollback: int = 0):
    """Logits of 12 decode steps under KIVI (rolling `rollback` tokens back and feeding them again first) and the
    session, whose layers hold the key-group tables."""
    session = engine.session(policy, kv_quant="kivi4r32")
    logits = [session.feed(PROMPT)]
    if rollback:
        session.rollback(rollback)
        logits.append(session.feed(PROMPT[-rollback:]))
    token = int(logits[-1].argmax())
    for _ in range(12):
        token, step_logits, _ = session.decode_step(token)
        logits.append(step_logits)
    return logits, session


@pytest.mark.parametrize("method, budget, rollback", [("streamingllm", 64, 0), ("h2o", 48, 0), ("asrkf", None, 0),
                                                      ("full", None, 80)])
def test_kivi_drops_the_key_groups_no_stored_row_refers_to(engine, monkeypatch, method, budget, rollback):
    """Tokens evicted (StreamingLLM: whole groups between its sinks and its window; H2O: scattered, per head) or
    rolled back (80 tokens: the group 128..159 goes whole) leave groups of scales and minimums no row refers to:
    they leave the table, and the bytes counted fall by exactly their size. Renumbering never changes a decoded
    key, so the logits are those of a run that keeps every group; frozen copies (ASR-KF-EGR) keep their groups."""
    def policy():
        return make_policy(method, budget)

    logits, session = _kivi_run(engine, policy(), rollback)
    with monkeypatch.context() as m:
        m.setattr(KeyGroups, "compact", lambda self, used: None)  # every group kept
        hoarded_logits, hoarded = _kivi_run(engine, policy(), rollback)
    for mine, theirs in zip(logits, hoarded_logits, strict=True):
        assert torch.equal(mine, theirs)
    dropped = 0
    for layer, other in zip(session.cache.layers, hoarded.cache.layers, strict=True):
        groups = layer.key_codec
        used = torch.cat([layer.active.key_groups().flatten(), layer.frozen.key_groups().flatten()])
        assert sorted(used[used >= 0].unique().tolist()) == list(range(groups.count))  # every group held is used
        assert other.key_codec.count >= groups.count
        dropped += (other.key_codec.count - groups.count) * groups.scale[:, :, :1].nbytes * 2
    if method == "asrkf":  # it freezes and evicts nothing: every group stays, its copies in the frozen store among them
        assert dropped == 0 and any(layer.frozen.used for layer in session.cache.layers)
    else:
        assert dropped > 0
    assert hoarded.cache.ledger.active_bytes - session.cache.ledger.active_bytes == dropped


def test_a_kivi_key_group_held_only_by_frozen_copies_stays_and_one_evicted_whole_goes():
    """Hand-fed: 160 prompt tokens leave groups 0..3 quantized (window 32); a decode step freezes group 0's tokens,
    evicts group 1's and quantizes group 4. Group 1 leaves the table (its scales and minimums no longer counted),
    group 0 stays for its frozen copies, which decode, and thaw, to the keys they held."""
    policy = Scripted()
    cache = make_cache(policy, kv_quant="kivi4r32")
    feed(cache, 0, 0, 160, heads=2, dim=32, prefill=True)
    layer = cache.layers[0]
    assert layer.key_codec.count == 4
    before = layer.keys[:, :, :32].clone()
    positions = torch.arange(161)
    policy.next = Decision(keep=positions >= 64, freeze=positions < 32)
    feed(cache, 0, 160, 1, heads=2, dim=32)
    assert layer.key_codec.count == 4  # groups 0, 2, 3 and the new 4; group 1 gone
    assert torch.equal(layer.frozen.keys(), before)
    rows = layer.active.n * layer.active.row_bytes()
    table = 2 * layer.key_codec.scale[:, :, :1].nbytes  # one group's scales and minimums (float16)
    assert cache.ledger.active_bytes == rows + layer.recent.nbytes + 4 * table
    policy.next = Decision(thaw=torch.ones(32, dtype=torch.bool))
    feed(cache, 0, 161, 1, heads=2, dim=32)
    thawed = layer.positions[0, 0] < 32
    assert torch.equal(layer.keys[:, :, thawed], before)


def test_quanto_rows_run_with_eviction_freezing_rollback_and_batches():
    wide = Engine(tiny.wide_llama(0), models.load_tokenizer(), prefill_chunk=64)
    for policy in (make_policy("h2o", 64), make_policy("asrkf"), make_policy("snapkv", 64)):
        r = wide.generate(PROMPT, policy, 12, kv_quant="quanto4", ignore_eos=True)
        assert r.tokens and r.cache.active_bytes < r.cache.full_bytes
    session = wide.session(make_policy("full"), kv_quant="quanto4")
    session.feed(PROMPT)  # chunks of 64, 64, 64, 8: the third flushed, the block holds 192..199
    layer = session.cache.layers[0]
    assert (layer.block.since, layer.block.held) == (192, 8)
    session.rollback(50)  # positions 150.. go, flushed ones among them: the block starts again at 150
    assert (layer.block.since, layer.block.held) == (150, 0)
    session.feed(PROMPT[:60])  # 60 < 128: held in full precision, read from the block
    assert layer.block.held == 60 and torch.equal(layer.keys[:, :, -60:], layer.block.k)
    batch = generate_batch(wide, [PROMPT, PROMPT[:120]], make_policy("h2o", 64), 6, ignore_eos=True,
                           kv_quant="quanto4")
    assert batch[1].tokens == wide.generate(PROMPT[:120], make_policy("h2o", 64), 6, ignore_eos=True,
                                            kv_quant="quanto4").tokens


def kept_sets(engine: Engine, method: str, scheme: str | None) -> list[list[list[int]]]:
    """After each forward, layer 0's kept positions per head."""
    kept = []

    def check(step) -> None:
        kept.append([sorted(row) for row in step.cache.layers[0].positions[0].tolist()])

    engine.generate(PROMPT, make_policy(method, 48), 6, on_step=check, ignore_eos=True, kv_quant=scheme)
    return kept


def test_a_method_scores_the_rows_as_stored_so_only_a_rule_on_positions_keeps_the_same_set(engine):
    """A policy sees the attention the model computed, over the rows as stored (dequantized): that is what the
    model attended, so a method scoring on attention (H2O, SnapKV) may keep other tokens under int4 than in the
    model's dtype. StreamingLLM decides on positions alone, so int4 keeps exactly its tokens."""
    quantized, plain = kept_sets(engine, "streamingllm", "int4"), kept_sets(engine, "streamingllm", None)
    assert quantized == plain and len(plain[-1][0]) == 48 and plain[-1][0][-1] > len(PROMPT)  # it did evict
