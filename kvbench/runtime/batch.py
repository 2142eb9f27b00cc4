"""Batched decoding over per-sequence caches: B sequences share each forward pass (the weights are read
once per step for all of them) while each keeps its own PolicyCache, its own length, its own evictions
and its own positions. Nothing is padded: the attention function attends each sequence over its own
rows (`kvbench_attention` gets a `BatchStep`), so no mask is needed and no pad token ever enters a cache.
Prompts are prefilled one sequence at a time (prefill is compute-bound; batching it buys little).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.kv.cache import PolicyCache
from kvbench.policy import KVPolicy, rollback_reserve
from kvbench.runtime.attention import STEP_KWARG
from kvbench.runtime.decode import Decoding, decode
from kvbench.runtime.few_rows import FewRowLinear, outside_few_row_linear
from kvbench.runtime.step import BatchStep

if TYPE_CHECKING:
    from kvbench.runtime.engine import Engine
    from kvbench.runtime.session import RunResult


class _BatchLayer(CacheLayerMixin):
    """Hands each sequence its row of the step's new keys and values."""

    is_sliding = False

    def __init__(self, owner: BatchCache, layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        with outside_few_row_linear():
            for b, cache in enumerate(self.owner.caches):
                cache.layers[self.layer_idx].update(key_states[b : b + 1], value_states[b : b + 1])
        return key_states, value_states  # unused: the attention function reads each sequence's own rows

    def get_seq_length(self) -> int:
        return max(c.layers[self.layer_idx].get_seq_length() for c in self.owner.caches)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """The cache handed to the model for one batched decode step over `caches` (one per sequence)."""

    def __init__(self, caches: list[PolicyCache]) -> None:
        self.caches = list(caches)
        super().__init__(layers=[_BatchLayer(self, i) for i in range(len(caches[0].layers))])


@torch.inference_mode()
def generate_batch(engine: Engine, prompts: Sequence[Sequence[int]], policy: KVPolicy, max_new_tokens: int = 32,
                   stop: Sequence[str] = (), ignore_eos: bool = False,
                   positions: str = "original", kv_quant: str | None = None) -> list[RunResult]:
    """Several prompts, decoded together. Each sequence gets its own copy of `policy` and its own cache
    (own length, evictions and positions); each decode step is one forward pass over the sequences
    still running. A sequence's decode times are the batched steps it took part in."""
    for ids in prompts:
        if not ids:
            raise ValueError("empty prompt")
        engine.check_fits(len(ids), max_new_tokens)
    if rollback_reserve(policy):  # it will undo and regenerate tokens
        raise ValueError(f"method {policy.name!r} rolls back and regenerates tokens, which batched decoding "
                         "cannot do; run it with batch size 1")
    replies, prefill_s = [], []
    for ids in prompts:
        session = engine.session(copy.deepcopy(policy), positions, kv_quant=kv_quant)
        logits, seconds = session.timed_feed(ids)
        prefill_s.append(seconds)
        replies.append(Decoding(session, logits, max_new_tokens, stop, ignore_eos))
    done = decode(replies, lambda live: _step(engine, live))
    return [d.session.result(len(ids), pre, reply)
            for ids, d, reply, pre in zip(prompts, replies, done, prefill_s, strict=True)]


def _step(engine: Engine, live: list[Decoding]) -> None:
    """One decode step for several sequences: one forward, each sequence over its own cache."""
    t = time.perf_counter()
    dev = engine.device
    sessions = [d.session for d in live]
    ids = torch.tensor([[d.last] for d in live], device=dev)
    pos = torch.tensor([[s.seen] for s in sessions], device=dev)
    rot = torch.cat([s.cache.next_rotations(pos[b : b + 1]) for b, s in enumerate(sessions)])
    step = BatchStep([s.step for s in sessions])
    step.begin(pos, rot)
    with FewRowLinear() if dev.type == "cpu" else contextlib.nullcontext():
        out = engine.model(input_ids=ids, position_ids=rot, use_cache=True, logits_to_keep=1,
                           **{engine.cache_arg: BatchCache([s.cache for s in sessions]), STEP_KWARG: step})
    step.end(engine.model.config._attn_implementation)
    logits = out.logits[:, -1]
    for b, s in enumerate(sessions):
        s.after_forward(1, logits[b])
    tokens = logits.argmax(-1).tolist()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    for b, d in enumerate(live):
        d.advance(tokens[b], logits[b], seconds)
