"""Batched decoding over per-sequence caches: B sequences share each forward pass (the weights are read
once per step for all of them) while each keeps its own PolicyCache, its own length, its own evictions
and its own positions. Nothing is padded: the attention function attends each sequence over its own
rows (`kvbench_attention` sees `caches`), so no mask is needed and no pad token ever enters a cache.
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
from kvbench.policy import KVPolicy, Phase, rollback_reserve
from kvbench.runtime.attention import CACHE_KWARG
from kvbench.runtime.few_rows import FewRowLinear, outside_few_row_linear

if TYPE_CHECKING:
    from kvbench.runtime.engine import Engine, RunResult, Session


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
        if not caches:
            raise ValueError("a batch needs at least one sequence")
        self.caches = list(caches)
        super().__init__(layers=[_BatchLayer(self, i) for i in range(len(caches[0].layers))])

    def begin_step(self, positions: torch.Tensor, rotations: torch.Tensor) -> None:
        """`positions` / `rotations`: [B, 1], each sequence's true position and the one it is rotated at."""
        for b, cache in enumerate(self.caches):
            cache.begin_step(positions[b : b + 1], Phase.DECODE, last_chunk=True, rotation_ids=rotations[b : b + 1])

    def end_step(self) -> None:
        for cache in self.caches:
            cache.end_step()


@torch.inference_mode()
def generate_batch(engine: Engine, prompts: Sequence[Sequence[int]], policy: KVPolicy, max_new_tokens: int = 32,
                   stop: Sequence[str] = (), ignore_eos: bool = False,
                   positions: str = "original") -> list[RunResult]:
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
    sessions, prefill_s, generated = [], [], []
    for ids in prompts:
        session = engine.session(copy.deepcopy(policy), positions)
        logits, seconds = session.timed_feed(ids)
        prefill_s.append(seconds)
        sessions.append(session)
        generated.append([int(logits.argmax())])
    eos_ids = set() if ignore_eos else engine.eos_ids
    decode_s: list[list[float]] = [[] for _ in prompts]
    live = [i for i in range(len(prompts)) if not engine.finished(generated[i], max_new_tokens, stop, eos_ids)]
    while live:
        t = time.perf_counter()
        logits = _step(engine, [sessions[i] for i in live], [generated[i][-1] for i in live])
        tokens = logits.argmax(-1).tolist()
        dt = time.perf_counter() - t
        for i, token in zip(live, tokens, strict=True):
            generated[i].append(token)
            decode_s[i].append(dt)
        live = [i for i in live if not engine.finished(generated[i], max_new_tokens, stop, eos_ids)]
    results = []
    for ids, session, gen, times, pre in zip(prompts, sessions, generated, decode_s, prefill_s, strict=True):
        results.append(session.result(len(ids), pre, session.finish(gen, times, stop, eos_ids)))
    return results


def _step(engine: Engine, sessions: list[Session], tokens: list[int]) -> torch.Tensor:
    """One decode step for several sequences: [B] next-token logits."""
    dev = engine.device
    ids = torch.tensor([[t] for t in tokens], device=dev)
    pos = torch.tensor([[s.seen] for s in sessions], device=dev)
    rot = torch.cat([s.cache.next_rotations(pos[b : b + 1]) for b, s in enumerate(sessions)])
    batch = BatchCache([s.cache for s in sessions])
    batch.begin_step(pos, rot)
    with FewRowLinear() if dev.type == "cpu" else contextlib.nullcontext():
        out = engine.model(input_ids=ids, position_ids=rot, use_cache=True, logits_to_keep=1,
                           **{engine.cache_arg: batch, CACHE_KWARG: batch})
    for s in sessions:
        s.check_attended()
    batch.end_step()
    logits = out.logits[:, -1]
    for b, s in enumerate(sessions):
        s.after_forward(1, logits[b])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return logits
