"""PolicyCache: a transformers `Cache` whose layers apply KVPolicy decisions with real data movement.

Every token of a layer is in exactly one of three places: active (on the compute device, seen by
attention), frozen (in the off-device store, pinned host memory on CUDA) or evicted (gone). Eviction
gathers the survivors into new tensors, so the dropped bytes are really released; freeze and thaw
copy rows between device and store bit for bit, with the token's true position and its per-token
policy state travelling along.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.policy import Decision, KVPolicy, LayerView


@dataclass
class Transfers:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.count += 1
        self.bytes += nbytes
        self.seconds += seconds


@dataclass
class CacheStats:
    """Counters of one sequence's run, summed over layers unless named per layer."""

    active_bytes: int
    frozen_bytes: int
    full_bytes: int  # what an uncompressed cache would hold now
    peak_active_bytes: int  # high-water mark of active KV, measured at every append and compaction
    peak_frozen_bytes: int
    seen_tokens: int  # per layer
    active_tokens: list[int]
    frozen_tokens: list[int]
    evicted_tokens: list[int]
    freezes: int
    thaws: int
    offload: Transfers
    restore: Transfers

    @property
    def kv_compression(self) -> float:
        return 1.0 - self.active_bytes / self.full_bytes if self.full_bytes else 0.0


def _as3d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))


def _index(mask: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Indices of the True entries along the last axis: 1-D when shared by every row, else [B, K, k]."""
    mask = _as3d(mask)
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return mask[0, 0].expand(shape[2]).nonzero().squeeze(-1)
    full = mask.expand(shape)
    counts = full.sum(-1)
    k = int(counts.flatten()[0])
    if not bool((counts == k).all()):
        raise ValueError("a decision must select the same number of tokens in every head and sequence")
    return torch.argsort((~full).to(torch.int8), dim=-1, stable=True)[..., :k]


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a [B, K, n, ...] tensor along axis 2 (a new tensor: the old one can be freed)."""
    if idx.dim() == 1:
        return t.index_select(2, idx.to(t.device))
    idx = idx.to(t.device)
    if t.dim() == 4:
        idx = idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, idx.expand(t.shape[0], t.shape[1], *idx.shape[2:]))


@dataclass
class FrozenStore:
    """Off-device rows of one layer: K/V, true positions and the policy's per-token state."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class PolicyLayer(CacheLayerMixin):
    """One layer's active KV plus its frozen store. `update` only appends; the policy runs after attention."""

    is_sliding = False

    def __init__(self, owner: PolicyCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.frozen = FrozenStore()
        self.seen = 0
        self.evicted = 0
        self.new_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, k, _, d = key_states.shape
        self.keys = key_states.new_empty((b, k, 0, d))
        self.values = value_states.new_empty((b, k, 0, value_states.shape[-1]))
        self.positions = torch.empty((b, k, 0), dtype=torch.long, device=self.device)
        self.state = {
            name: torch.zeros((b, k, 0), dtype=torch.float32, device=self.device)
            for name in self.owner.policy.token_state
        }
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, k, q, _ = key_states.shape
        before = self.keys.nbytes + self.values.nbytes
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        pos = self.owner.pending_positions.to(self.device)  # [B, q]
        self.positions = torch.cat([self.positions, pos[:, None, :].expand(b, k, q)], dim=2)
        for name, t in self.state.items():
            self.state[name] = torch.cat([t, t.new_zeros((b, k, q))], dim=2)
        self.seen += q
        self.new_tokens = q
        self.owner._account(self.keys.nbytes + self.values.nbytes - before, 0)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def get_max_length(self) -> int:
        return -1

    def view(self, attn: torch.Tensor | None) -> LayerView:
        f = self.frozen
        return LayerView(
            layer_idx=self.layer_idx,
            num_layers=len(self.owner.layers),
            keys=self.keys,
            values=self.values,
            positions=self.positions,
            new_tokens=self.new_tokens,
            seen=self.seen,
            prefill=self.owner.prefill,
            attn=attn,
            state=self.state,
            frozen_positions=f.positions,
            frozen_state=f.state,
            step=self.owner.steps,
            extras=self.owner.extras,
        )

    # -- applying a decision ------------------------------------------------------------------
    def apply(self, d: Decision) -> None:
        b, k, n, _ = self.keys.shape
        shape = (b, k, n)
        keep = torch.ones(shape, dtype=torch.bool, device=self.device) if d.keep is None else _as3d(d.keep)
        freeze = None if d.freeze is None else _as3d(d.freeze).expand(shape)
        if freeze is not None and bool((keep.expand(shape) & freeze).any()):
            raise ValueError(f"layer {self.layer_idx}: a token cannot be both kept and frozen")
        thaw = None
        if d.thaw is not None and self.frozen.size:
            m_shape = (b, k, self.frozen.size)
            thaw_mask = _as3d(d.thaw.to(self.frozen.keys.device)).expand(m_shape)
            if bool(thaw_mask.any()):
                thaw = (_index(thaw_mask, m_shape), _index(~thaw_mask, m_shape))

        before = self.keys.nbytes + self.values.nbytes
        frozen_before = self.frozen.nbytes
        kept_count = int(_as3d(keep).expand(shape)[0, 0].sum())
        frozen_count = 0 if freeze is None else int(freeze[0, 0].sum())
        thawed = None if thaw is None else self._pop_frozen(*thaw)
        if frozen_count:
            self._push_frozen(_index(freeze, shape))
        if kept_count < n:
            idx = _index(keep, shape)
            self.keys, self.values = _take(self.keys, idx), _take(self.values, idx)
            self.positions = _take(self.positions, idx)
            self.state = {name: _take(t, idx) for name, t in self.state.items()}
            self.evicted += n - kept_count - frozen_count
        if thawed is not None:
            self._append_rows(*thawed)
        self.owner._account(
            self.keys.nbytes + self.values.nbytes - before, self.frozen.nbytes - frozen_before
        )

    def _push_frozen(self, idx: torch.Tensor) -> None:
        """Copy the rows `idx` to the off-device store (the caller drops them from the active set)."""
        t0 = time.perf_counter()
        rows = [self.owner.to_store(_take(t, idx)) for t in (self.keys, self.values)]
        pos = _take(self.positions, idx).cpu()
        state = {name: _take(t, idx).cpu() for name, t in self.state.items()}
        f = self.frozen
        if f.keys is None:
            f.keys, f.values, f.positions, f.state = rows[0], rows[1], pos, state
        else:
            f.keys = torch.cat([f.keys, rows[0]], dim=2)
            f.values = torch.cat([f.values, rows[1]], dim=2)
            f.positions = torch.cat([f.positions, pos], dim=2)
            f.state = {name: torch.cat([f.state[name], s], dim=2) for name, s in state.items()}
        self.owner.freezes += pos.shape[2]
        self.owner.offload.add(rows[0].nbytes + rows[1].nbytes, time.perf_counter() - t0)

    def _pop_frozen(self, idx: torch.Tensor, remain_idx: torch.Tensor):
        """Take rows `idx` out of the store, back on the compute device; `remain_idx` stay frozen."""
        t0 = time.perf_counter()
        f, dev = self.frozen, self.device
        out = [_take(t, idx).to(dev, non_blocking=True) for t in (f.keys, f.values, f.positions)]
        state = {name: _take(t, idx).to(dev) for name, t in f.state.items()}
        if remain_idx.shape[-1]:
            f.keys, f.values, f.positions = (_take(t, remain_idx) for t in (f.keys, f.values, f.positions))
            f.state = {name: _take(t, remain_idx) for name, t in f.state.items()}
        else:
            self.frozen = FrozenStore()
        self.owner.thaws += out[0].shape[2]
        self.owner.restore.add(out[0].nbytes + out[1].nbytes, time.perf_counter() - t0)
        return (*out, state)

    def _append_rows(self, keys, values, positions, state) -> None:
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.positions = torch.cat([self.positions, positions], dim=2)
        self.state = {name: torch.cat([t, state[name]], dim=2) for name, t in self.state.items()}


class PolicyCache(Cache):
    """The cache the engine hands to the model: one PolicyLayer per decoder layer, one policy for all."""

    def __init__(self, policy: KVPolicy, num_layers: int, device: torch.device | str = "cpu") -> None:
        self.policy = policy
        super().__init__(layers=[PolicyLayer(self, i) for i in range(num_layers)])
        device = torch.device(device)
        self.pin_memory = device.type == "cuda"
        self.pending_positions = torch.zeros((1, 0), dtype=torch.long)
        self.prefill = True
        self.attn_rows = 0
        self.steps = 0
        self.extras: dict = {}
        self.active_bytes = 0
        self.frozen_bytes = 0
        self.peak_active_bytes = 0
        self.peak_frozen_bytes = 0
        self.freezes = 0
        self.thaws = 0
        self.offload = Transfers()
        self.restore = Transfers()

    # -- called by the engine around each forward ---------------------------------------------
    def begin_step(self, position_ids: torch.Tensor, prefill: bool, last_chunk: bool = True) -> None:
        self.pending_positions = position_ids
        self.prefill = prefill
        self.attn_rows = self.policy.wants_attention(prefill, last_chunk)

    def end_step(self) -> None:
        self.steps += 1

    # -- called by the attention function after computing a layer's output ----------------------
    def after_attention(self, layer_idx: int, attn: torch.Tensor | None) -> None:
        layer = self.layers[layer_idx]
        decision = self.policy.step(layer.view(attn))
        if decision is not None:
            layer.apply(decision)

    # -- accounting -------------------------------------------------------------------------------
    def _account(self, active_delta: int, frozen_delta: int) -> None:
        self.active_bytes += active_delta
        self.frozen_bytes += frozen_delta
        self.peak_active_bytes = max(self.peak_active_bytes, self.active_bytes)
        self.peak_frozen_bytes = max(self.peak_frozen_bytes, self.frozen_bytes)

    def to_store(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (fresh rows from a gather) in host memory: pinned and asynchronous on CUDA."""
        if not self.pin_memory:
            return t.to("cpu")
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    def token_bytes(self) -> int:
        """Bytes one token occupies across all layers (K and V)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, k, _, d = layer.keys.shape
                total += b * k * (d + layer.values.shape[-1]) * layer.keys.element_size()
        return total

    def stats(self) -> CacheStats:
        layers = self.layers
        seen = layers[0].seen if layers else 0
        return CacheStats(
            active_bytes=self.active_bytes,
            frozen_bytes=self.frozen_bytes,
            full_bytes=seen * self.token_bytes(),
            peak_active_bytes=self.peak_active_bytes,
            peak_frozen_bytes=self.peak_frozen_bytes,
            seen_tokens=seen,
            active_tokens=[layer.get_seq_length() for layer in layers],
            frozen_tokens=[layer.frozen.size for layer in layers],
            evicted_tokens=[layer.evicted for layer in layers],
            freezes=self.freezes,
            thaws=self.thaws,
            offload=dataclasses.replace(self.offload),
            restore=dataclasses.replace(self.restore),
        )
