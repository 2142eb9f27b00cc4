"""Model sources: the bundled alias, a .gguf path and a local HF directory all load offline."""

import pytest

from kvbench import models
from kvbench.engine import Engine
from kvbench.policy import make_policy

pytestmark = pytest.mark.model


def answer(model: str) -> str:
    lm, tok = models.load(model)
    engine = Engine(lm, tok)
    return engine.generate(engine.encode_chat("What is the capital of France?"), make_policy("full"), 8).text


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
