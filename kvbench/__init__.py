"""kvbench: compare LLM KV-cache compression policies with real eviction, honestly measured.

Run a method on a model in a few lines (the names below load on first use, so `import kvbench` stays cheap):

    import kvbench

    model, tokenizer = kvbench.load("smollm2-135m")  # a bundled alias, a .gguf, a HF folder or a cached model id
    engine = kvbench.Engine(model, tokenizer)        # or a supported transformers model you loaded yourself
    ids = kvbench.encode_chat(tokenizer, "What is the capital of France?")
    out = engine.generate(ids, kvbench.make_policy("snapkv", budget=256), max_new_tokens=32)
    print(out.text, out.cache.kv_compression)

`kvbench.available_methods()` lists the registered methods; a method of your own subclasses `kvbench.ScorerPolicy` or
`kvbench.KVPolicy` and is registered with `@kvbench.register("name")` (README, Adding a method).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "kvbench.runtime.models", "load_tokenizer": "kvbench.runtime.models",
    "Engine": "kvbench.runtime.engine", "RunResult": "kvbench.runtime.session",
    "encode_chat": "kvbench.runtime.chat", "generate_batch": "kvbench.runtime.batch",
    "make_policy": "kvbench.policy", "KVPolicy": "kvbench.policy", "ScorerPolicy": "kvbench.policy",
    "Budget": "kvbench.policy", "Decision": "kvbench.policy", "LayerView": "kvbench.policy",
    "register": "kvbench.policy", "param": "kvbench.policy",
}
__all__ = [*_EXPORTS, "available_methods"]


def available_methods() -> list[str]:
    """The registered methods' names (`kvbench methods` lists their parameters)."""
    from kvbench.policy import available

    return available()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvbench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
