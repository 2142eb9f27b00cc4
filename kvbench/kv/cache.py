"""PolicyCache: a transformers `Cache` whose layers apply KVPolicy decisions with real data movement.

Every token of a layer is in exactly one of three places: active (on the compute device, seen by
attention), frozen (in the off-device store, pinned host memory on CUDA) or evicted (gone). `Rows`
(kvbench/kv/rows.py) holds the active data: evicted rows are overwritten and sparse buffers are
reallocated smaller, so dropped bytes are really released. `FrozenStore` (kvbench/kv/store.py) holds
host copies, written once per token; a thaw copies a token back bit for bit, with its true position
and its per-token policy state travelling along.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.kv.accounting import CacheStats, Ledger
from kvbench.kv.positions import PositionMode
from kvbench.kv.rope import Rope
from kvbench.kv.rows import RowData, Rows, gather, new_meta
from kvbench.kv.store import FrozenStore
from kvbench.policy import ActsBeforeStep, Decision, KVPolicy, LayerView, Phase, reads_queries, rollback_reserve

RECENT_STEPS = 8  # steps over which an active buffer must stay mostly empty before it is shrunk (`compact`)


def _as3d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))


def _index(mask: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Indices of the True entries along the last axis: 1-D when the same in every row (a per-head mask built
    from positions, as StreamingLLM's, usually is), else [B, K, k]."""
    mask = _as3d(mask)
    if mask.shape[0] * mask.shape[1] > 1 and bool((mask == mask[:1, :1]).all()):
        mask = mask[:1, :1]
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return mask[0, 0].expand(shape[2]).nonzero().squeeze(-1)
    full = mask.expand(shape)
    counts = full.sum(-1)
    k = int(counts.flatten()[0])
    if not bool((counts == k).all()):
        raise ValueError("a decision must select the same number of tokens in every head and sequence")
    return full.nonzero()[:, 2].view(shape[0], shape[1], k)  # row-major: each row's indices, ascending


@dataclass(frozen=True)
class LayerHandle:
    """All a layer takes from its cache, fixed when the cache is built: the layer never reaches back into it (what
    changes per step, the step and its phase, comes with each `view` call)."""

    ledger: Ledger  # what the layer's changes are reported to
    token_state: tuple[str, ...]  # the policy's per-token state fields
    pin_memory: bool  # frozen rows in pinned host memory (CUDA)
    rollback_reserve: int  # positions a sliding layer keeps beyond its window for a rollback
    position_mode: PositionMode
    num_layers: int
    new_meta: Callable[[tuple[int, int, int], torch.device], torch.Tensor]  # this step's new rows' meta


class PolicyLayer(CacheLayerMixin):
    """One layer: active rows on the compute device, frozen rows in host memory. `update` only appends;
    the policy runs after attention (`PolicyCache.after_attention`) and its decision is applied here.
    A sliding layer (`window` w) drops the tokens no later query can see, keeping the last w - 1
    positions as transformers' `DynamicSlidingWindowLayer` does (`expire`)."""

    def __init__(self, handle: LayerHandle, layer_idx: int, window: int | None = None) -> None:
        super().__init__()
        self.handle = handle
        self.ledger = handle.ledger
        self.layer_idx = layer_idx
        self.window = window
        self.is_sliding = window is not None
        self.expired = 0
        self.expired_below = 0  # positions below this may have left the window (gone, not evicted)
        self.active = Rows(handle.token_state, torch.device("cpu"))
        self.frozen = FrozenStore(handle.token_state, pin=handle.pin_memory)
        self._handed: dict[str, torch.Tensor] = {}  # the active state views handed to the policy
        self.seen = 0
        self.evicted = 0
        self.new_tokens = 0
        self.heads_aligned = True  # every head holds the same token at each row (no per-head eviction yet)
        self._recent: deque[int] = deque(maxlen=RECENT_STEPS)  # active rows at the end of recent steps

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.active.device = self.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        before = self._sizes()
        self.active.append((key_states, value_states, self.handle.new_meta((b, h, q), self.device)))
        self.seen += q
        self.new_tokens = q
        self._refresh(before)
        return self.keys, self.values

    def _sizes(self) -> tuple[int, int, int]:
        return self.active.nbytes, self.frozen.nbytes, self.active.reserved_bytes

    def _refresh(self, before: tuple[int, int, int]) -> None:
        self.keys, self.values = self.active.keys(), self.active.values()
        self.ledger.resized(*(after - prev for after, prev in zip(self._sizes(), before, strict=True)))

    @property
    def positions(self) -> torch.Tensor:
        return self.active.positions()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.active.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.active.n

    def full_tokens(self) -> int:
        """Tokens transformers' own cache would hold in this layer now: all seen, or a window's last w - 1."""
        return self.seen if self.window is None else min(self.seen, self.window - 1)

    def expire(self, attn: torch.Tensor | None) -> torch.Tensor | None:
        """Drop active and frozen tokens that left the window (no later query can attend them again), and
        return `attn` with its columns following the rows that stay. When heads hold different tokens after
        per-head evictions, each head drops as many of its oldest as the head with fewest outside the window;
        the rest stay active (counted) and masked by the attention function until the policy drops them."""
        start = self.seen - self.window + 1 - self.handle.rollback_reserve  # the oldest a later query can see
        before = self._sizes()
        f, dropped = self.frozen, 0
        if f.n:
            gone = (f.positions()[0, 0] < start).nonzero().squeeze(-1)
            f.discard(gone)
            dropped = gone.numel()
        positions = self.active.positions()
        outside = positions < start
        count = int(outside.sum(-1).min()) if self.active.n else 0
        if count:
            if self.heads_aligned:
                idx = outside[0, 0].nonzero().squeeze(-1)
            else:
                idx = positions.topk(count, dim=-1, largest=False).indices.sort(-1).values
            self.active.remove(idx)
        if count + dropped:
            self.expired += count + dropped
            self.expired_below = start
        self._refresh(before)
        if attn is None or not count:
            return attn
        return _follow(attn, positions, self.active.positions())

    def get_max_length(self) -> int:
        return -1

    def drop_from(self, first: int) -> None:
        """Remove the tokens at positions >= `first`, active or frozen, as if never fed (`seen` shrinks with
        them). Those the policy had evicted are uncounted; earlier tokens it evicted stay evicted."""
        before = self._sizes()
        f = self.frozen
        frozen = 0
        if f.n:
            gone = (f.positions()[0, 0] >= first).nonzero().squeeze(-1)
            f.discard(gone)
            frozen = gone.numel()
        active = 0
        if self.active.n:
            later = self.active.positions() >= first
            if bool(later.any()):
                idx = _index(later, tuple(later.shape))
                self.active.remove(idx)
                active = idx.shape[-1]
        undone = max(0, self.seen - first)
        self.evicted -= undone - active - frozen
        self.seen -= undone
        self._refresh(before)

    def view(self, attn: torch.Tensor | None, step: int, phase: Phase) -> LayerView:
        f = self.frozen
        frozen_positions, frozen_state = f.view() if f.n else (None, {})
        self._handed = self.active.state_view()
        return LayerView(
            layer_idx=self.layer_idx,
            num_layers=self.handle.num_layers,
            window=self.window,
            full_tokens=self.full_tokens(),
            keys=self.keys,
            values=self.values,
            positions=self.active.positions(),
            new_tokens=self.new_tokens,
            seen=self.seen,
            attn=attn,
            state=dict(self._handed),
            frozen_positions=frozen_positions,
            frozen_state=dict(frozen_state),
            step=step,
            phase=phase,
        )

    def store_state(self, view: LayerView) -> None:
        """Write back the per-token state the policy changed. Active state entries are views of the buffer
        (in-place edits are already there); frozen ones are gathered copies, so edited ones go back too."""
        replaced = {k: t for k, t in view.state.items() if t is not self._handed.get(k)}
        if replaced:
            self.active.set_state(replaced)
        if view.frozen_positions is not None:
            self.frozen.write_back(view.frozen_state)

    def compact(self, slack: int, settle: bool) -> None:
        """Return a mostly empty active buffer to the allocator: once over `slack` times the most rows it held at
        the end of this step or of any of the RECENT_STEPS - 1 before it is reserved (`settle`: the end of a
        prompt, judged on the rows held now). Judging on recent steps keeps a size that swings (ASR-KF-EGR's
        freeze and thaw cohorts: ~100 <-> ~600 rows every other step at 1k) from reallocating and copying the
        buffer twice a step."""
        if settle:
            self._recent.clear()
        self._recent.append(self.active.n)
        high = max(self._recent)
        if self.active.cap - slack * high <= 64:
            return
        before = self._sizes()
        self.active.shrink(high)
        self._refresh(before)

    # -- applying a decision ------------------------------------------------------------------
    def apply(self, d: Decision) -> None:
        b, h, n = self.keys.shape[:3]
        shape = (b, h, n)
        before = self._sizes()
        keep = None if d.keep is None else _as3d(d.keep)
        freeze = None if d.freeze is None else _as3d(d.freeze)
        if keep is not None and freeze is not None and bool((keep & freeze).any()):
            raise ValueError(f"layer {self.layer_idx}: a token cannot be both kept and frozen")
        # validate both masks before anything moves, so a refused decision loses nothing
        freeze_idx = self._shared_index(freeze, n, "freeze") if freeze is not None else None
        thaw_idx = thawed = None
        if d.thaw is not None and self.frozen.n:
            thaw_idx = self._shared_index(d.thaw.cpu(), self.frozen.n, "thaw")
        if thaw_idx is not None and thaw_idx.numel():
            thawed = self._restore_rows(thaw_idx)
        frozen = 0 if freeze_idx is None else freeze_idx.numel()
        if frozen:
            self._offload_rows(freeze_idx)
        drop = None if keep is None else ~keep
        if drop is None and freeze_idx is not None:  # keep=None: the frozen rows leave, nothing is evicted
            drop_idx = freeze_idx
        elif drop is not None and bool(drop.any()):
            drop_idx = _index(drop, shape)
        else:
            drop_idx = torch.empty(0, dtype=torch.long, device=self.device)
        self.active.swap(drop_idx, thawed)
        self.heads_aligned &= drop_idx.dim() == 1
        self.evicted += drop_idx.shape[-1] - frozen
        self.handle.position_mode.settle(self.active)
        self._refresh(before)

    def _shared_index(self, mask: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """1-D indices of a freeze or thaw mask. The frozen store keeps one slot per token for all KV
        heads, so these masks must agree across heads, over rows that hold the same token in every head."""
        mask = _as3d(mask)
        if mask.shape[0] * mask.shape[1] > 1 and not bool((mask == mask[:1, :1]).all()):
            raise ValueError(f"layer {self.layer_idx}: {what} decisions must be the same for every KV head "
                             "(the frozen store keeps one copy per token); use a [n] or [B, 1, n] mask")
        idx = mask[0, 0].expand(n).nonzero().squeeze(-1)
        if what == "freeze" and idx.numel() and not self.heads_aligned:
            raise ValueError(f"layer {self.layer_idx}: cannot freeze after per-head evictions (the heads hold "
                             "different tokens at the same rows)")
        return idx

    def _offload_rows(self, idx: torch.Tensor) -> None:
        """Freeze active rows `idx`: host copies of those without one, the policy state of all of them."""
        t0 = time.perf_counter()
        rows = self.active
        meta = gather(rows.meta, idx).cpu()

        def fetch(new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sel = idx[new.to(idx.device)]
            return gather(rows.k, sel), gather(rows.v, sel)

        copied = self.frozen.put(meta, fetch)
        self.ledger.froze(idx.numel(), copied, time.perf_counter() - t0)

    def _restore_rows(self, idx: torch.Tensor) -> RowData:
        """Device copies of frozen tokens `idx`, bound for the active rows."""
        t0 = time.perf_counter()
        k, v, meta = self.frozen.take(idx)
        dev = self.device
        rows = (k.to(dev, non_blocking=True), v.to(dev, non_blocking=True), meta.to(dev))
        self.ledger.thawed(meta.shape[2], k.nbytes + v.nbytes, time.perf_counter() - t0)
        return rows


def _follow(attn: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Attention columns [B, K, G, w, n] of rows with positions `before` ([B, K, n]), picked and reordered for
    the rows now holding positions `after` ([B, K, m]; a head holds each position at most once)."""
    order = before.argsort(-1)
    cols = order.gather(-1, torch.searchsorted(before.gather(-1, order), after))
    b, k, g, w, _ = attn.shape
    return attn.gather(-1, cols[:, :, None, None, :].expand(b, k, g, w, cols.shape[-1]))


class PolicyCache(Cache):
    """The cache the engine hands to the model: one PolicyLayer per decoder layer, one policy for all."""

    def __init__(self, policy: KVPolicy, num_layers: int, device: torch.device | str = "cpu",
                 positions: str = "original", rope: Rope | None = None,
                 windows: tuple[int | None, ...] | None = None) -> None:
        """`windows`: each layer's sliding window (None: full attention), from `architectures.layout`."""
        self.position_mode = PositionMode(positions, rope)
        windows = windows or (None,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows given for {num_layers} layers")
        self.policy = policy
        self.ledger = Ledger()
        pin = torch.device(device).type == "cuda"  # frozen rows in pinned host memory
        handle = LayerHandle(self.ledger, tuple(policy.token_state), pin, rollback_reserve(policy),
                             self.position_mode, num_layers, self.new_meta)
        super().__init__(layers=[PolicyLayer(handle, i, w) for i, w in enumerate(windows)])
        self.attended = 0  # layers whose attention ran in this step (the engine checks every layer did)
        self.pending_positions = torch.zeros((1, 0), dtype=torch.long)
        self.pending_rotations = self.pending_positions
        self._new_meta: torch.Tensor | None = None  # this step's new rows' meta, shared by the layers (`new_meta`)
        self.phase = Phase.PREFILL  # named by the engine at each step (`begin_step`)
        self.last_chunk = False
        self.attn_rows = 0
        self.applying = True
        self.steps = 0
        self.reads_queries = reads_queries(policy)  # the attention function asks `thaw_on_demand` first

    # -- called by the engine around each forward ---------------------------------------------
    def begin_step(self, position_ids: torch.Tensor, phase: Phase, last_chunk: bool = True,
                   rotation_ids: torch.Tensor | None = None) -> None:
        """`position_ids`: the new tokens' true positions; `phase`: what this forward does (a question fed after
        its compressed context is `QUERY`: not a prompt a one-shot method compresses again); `rotation_ids`: the
        positions the model rotates them at (the same in `original` mode, in-cache positions in `rerotate` and
        `naive`)."""
        self.pending_positions = position_ids
        self.pending_rotations = position_ids if rotation_ids is None else rotation_ids
        self._new_meta = None
        self.attended = 0
        self.phase = phase
        self.last_chunk = last_chunk
        self.attn_rows = self.policy.wants_attention(self.phase, last_chunk)
        self.applying = self.policy.compresses(self.phase, last_chunk)  # the schedule: decisions take effect
        if isinstance(self.policy, ActsBeforeStep) and self.policy.acts_before_step(self.steps, self.phase):
            self._before_step()

    def thaw_on_demand(self, layer_idx: int,
                       score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
        """Before a layer's attention: let a policy that reads queries (`ReadsQueries`) thaw frozen tokens for them.
        `score(frozen_keys, frozen_positions)` gives the queries' probabilities over the frozen tokens (the
        attention function computes them). Whether the active rows changed. The reading is counted
        (`frozen_scored`: frozen keys read, per layer and step) and timed with the policy."""
        layer = self.layers[layer_idx]
        if not layer.frozen.n:
            return False
        with self.ledger.policy_time(self.phase):
            view = layer.view(None, self.steps, self.phase)
            self.ledger.frozen_scored += layer.frozen.n
            view.frozen_attn = score(layer.frozen.keys().to(layer.device), view.frozen_positions.to(layer.device))
            return self._decide(layer, view, self.policy.on_queries) is not None

    def _before_step(self) -> None:
        """Apply the policy's `before_step` decision to every layer that has frozen or active tokens."""
        with self.ledger.policy_time(self.phase):
            for layer in self.layers:
                if layer.is_initialized:
                    self._decide(layer, layer.view(None, self.steps, self.phase), self.policy.before_step)

    def _decide(self, layer: PolicyLayer, view: LayerView, decide: Callable[[LayerView], Decision | None],
                apply: bool = True) -> Decision | None:
        """One policy hook on one layer: its decision, the per-token state it changed written back, and the
        decision applied (unless `apply` is False: the schedule lets it observe, not act)."""
        decision = decide(view)
        if self.policy.token_state:
            layer.store_state(view)
        if decision is not None and apply:
            layer.apply(decision)
        return decision

    def new_meta(self, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Meta rows [B, K, q, C] of this step's new tokens: the same in every layer (layers copy them into
        their own buffers), so built once per step instead of once per layer (~10 small ops each)."""
        meta = self._new_meta
        if meta is None or meta.shape[:3] != shape or meta.device != device:
            pos = self.pending_positions.to(device)[:, None, :].expand(shape)
            rot = self.pending_rotations.to(device)[:, None, :].expand(shape)
            meta = self._new_meta = new_meta(pos, rot, len(self.policy.token_state))
        return meta

    def drop_from(self, first_position: int) -> None:
        """Remove every token at or after `first_position` from all layers, as if never fed (the scratch
        tokens of a reconstruction pass). Not an eviction: `seen` shrinks with them."""
        for layer in self.layers:
            layer.drop_from(first_position)

    def roll_back(self, first_position: int) -> None:
        """Undo every token from `first_position` on (`Session.rollback`): refused, with nothing changed, where a
        sliding layer already dropped a position that re-fed tokens would see again."""
        for layer in self.layers:
            if layer.window is not None and layer.expired_below > max(0, first_position - layer.window + 1):
                raise ValueError(
                    f"cannot roll back to position {first_position}: layer {layer.layer_idx}'s sliding window "
                    f"({layer.window}) already dropped positions below {layer.expired_below}, which re-fed tokens "
                    f"would attend; a policy that rolls back must reserve rows for it (`RollsBack.rollback_reserve`)")
        self.ledger.rolled_back(max(0, self.layers[0].seen - first_position))
        self.drop_from(first_position)

    def compress(self) -> None:
        """After a reconstruction pass: one policy step per layer with the completed scores (no attention)."""
        self.phase = Phase.COMPRESS
        self.applying = True
        for i in range(len(self.layers)):
            self.after_attention(i, None)
        self.end_step()
        self.phase = Phase.PREFILL

    def next_rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions to give the model for the next tokens (true `positions`, [1, q]) under the position mode."""
        return self.position_mode.next_rotations(positions, [layer.active.n for layer in self.layers],
                                                 self.policy.name)

    def end_step(self) -> None:
        # at the end of the prompt, give back what prefill chunks reserved; later only clearly idle space,
        # so a cache whose size swings (freeze/thaw) does not reallocate every step
        settle = self.phase != Phase.DECODE and self.last_chunk
        for layer in self.layers:
            layer.compact(2 if settle else 4, settle)
        self.steps += 1
        self.ledger.step_ended(self.full_bytes())

    # -- called by the attention function after computing a layer's output ----------------------
    def after_attention(self, layer_idx: int, attn: torch.Tensor | None) -> None:
        """Drop what left a sliding layer's window (not during a reconstruction pass, whose scratch tokens are
        removed again), then run the policy on the layer and apply its decision. The policy is timed by phase
        (`policy_seconds`): the bookkeeping a method adds to `full`'s step, which its smaller attention has
        to pay for."""
        self.attended += 1
        layer = self.layers[layer_idx]
        if layer.window is not None and self.phase != Phase.RECONSTRUCT:
            attn = layer.expire(attn)
        if self.policy.passive or not (self.applying or self.policy.observes):
            return
        with self.ledger.policy_time(self.phase):
            self._decide(layer, layer.view(attn, self.steps, self.phase), self.policy.step, self.applying)

    # -- accounting (kvbench/kv/accounting.py) ---------------------------------------------------
    def full_bytes(self) -> int:
        """K/V bytes transformers' own cache would hold now (a sliding layer: its window's last w - 1 tokens)."""
        return sum(layer.full_tokens() * layer.active.row_bytes() for layer in self.layers)

    def stats(self) -> CacheStats:
        layers = self.layers
        seen = layers[0].seen if layers else 0
        return CacheStats(
            **self.ledger.figures(self.steps),
            frozen_store_bytes=sum(layer.frozen.held_bytes for layer in layers),
            full_bytes=self.full_bytes(),
            token_bytes=sum(layer.active.row_bytes() for layer in layers),
            seen_tokens=seen,
            active_tokens=[layer.active.n for layer in layers],
            frozen_tokens=[layer.frozen.n for layer in layers],
            evicted_tokens=[layer.evicted for layer in layers],
            expired_tokens=[layer.expired for layer in layers],
        )
