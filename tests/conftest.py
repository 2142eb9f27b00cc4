"""Shared fixtures. The model fixtures load the real bundled SmolLM2-135M (dequantized copy cached)."""

from __future__ import annotations

import os

import pytest
import torch

from kvbench.kv.cache import PolicyCache
from kvbench.policy import Decision, KVPolicy, LayerView, Phase
from kvbench.runtime.step import SequenceStep


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs one pytest-xdist worker per core: each worker's torch takes its share of the cores (two
    workers of two threads each on two cores run slower than one)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def assert_valid_results(document: dict) -> None:
    """A results.json as the code wrote it conforms to the JSON Schema shipped in the package."""
    import json

    import jsonschema

    from kvbench.evaluation.results import SCHEMA_PATH

    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="session")
def model_and_tokenizer():
    from kvbench.runtime import models

    torch.manual_seed(0)
    return models.load(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def engine(model_and_tokenizer):
    from kvbench.runtime.engine import Engine

    model, tok = model_and_tokenizer
    return Engine(model, tok, prefill_chunk=128)


def feed(cache: PolicyCache, layer: int, start: int, q: int, heads: int = 2, dim: int = 4,
         attn: torch.Tensor | None = None, gen: torch.Generator | None = None, prefill: bool = False,
         keys: torch.Tensor | None = None, last_chunk: bool = True, query: bool = False,
         phase: Phase | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append q synthetic tokens at positions start.. to one layer and run the policy, as attention would. The
    step's phase: `phase` if given, else a question (`query`), a prompt chunk (`prefill`) or a decode step."""
    phase = phase or (Phase.QUERY if query else Phase.PREFILL if prefill else Phase.DECODE)
    driver(cache).begin(torch.arange(start, start + q)[None], phase, last_chunk=last_chunk)
    k = torch.randn(1, heads, q, dim, generator=gen) if keys is None else keys
    v = torch.randn(1, heads, q, dim, generator=gen)
    cache.layers[layer].update(k, v)
    driver(cache).after_attention(layer, attn)
    driver(cache).end()
    return k, v


class Scripted(KVPolicy):
    """Applies one pre-set decision on the next step, then nothing."""

    def __init__(self):
        super().__init__()
        self.next: Decision | None = None

    def step(self, view: LayerView) -> Decision | None:
        d, self.next = self.next, None
        return d


_drivers: dict[int, SequenceStep] = {}


def make_cache(policy: KVPolicy, layers: int = 1, windows: tuple[int | None, ...] | None = None,
               kv_quant: str | None = None) -> PolicyCache:
    """A cache for hand-fed steps; `driver(cache)` is the step driver that runs `policy` on it."""
    cache = PolicyCache(policy, layers, windows=windows, kv_quant=kv_quant)
    _drivers[id(cache)] = SequenceStep(policy, cache)
    return cache


def driver(cache: PolicyCache) -> SequenceStep:
    step = _drivers[id(cache)]
    assert step.cache is cache
    return step
