"""Model sources: the bundled alias, a .gguf path and a local HF directory all load offline."""

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


def test_dequantized_copies_are_keyed_by_the_file_content_not_its_path(tmp_path):
    import shutil

    bundled = models.resolve(models.DEFAULT_MODEL)
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(bundled.directory / bundled.gguf_file, copy)
    same = models._dequantized_dir(models.resolve(str(copy))).name.rsplit("-", 1)[1]
    assert same == models._dequantized_dir(bundled).name.rsplit("-", 1)[1]
    with copy.open("ab") as f:  # one byte more: another file, another copy
        f.write(b"\0")
    assert models._dequantized_dir(models.resolve(str(copy))).name.rsplit("-", 1)[1] != same


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
    return {"truncated gguf": (str(truncated), f"cannot read the GGUF file {truncated} (truncated or damaged?)"),
            "no weights": (str(no_weights), f"cannot load the weights in {no_weights}"),
            "no tokenizer": (str(no_tokenizer), f"cannot load a tokenizer from {no_tokenizer}"),
            "bad config": (str(bad_config), f"cannot read the model config in {bad_config}"),
            "a text file": (str(text), f"--model {text} is a file but not a .gguf model")}


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
    assert not list((tmp_path / "cache").rglob("truncated*"))  # no half-dequantized copy left behind
