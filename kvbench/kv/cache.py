"""PolicyCache: a transformers `Cache` whose layers (`PolicyLayer`, kvbench/kv/layer.py) hold each token active,
frozen or not at all, with real data movement, and count what they hold and move (one `Ledger`).

It stores and counts only: when the policy runs and which decision is applied where is the step driver's
(kvbench/runtime/step.py). Every token of a layer is in exactly one of three places: active (on the compute device,
seen by attention), frozen (in the off-device store, pinned host memory on CUDA) or evicted (gone).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from kvbench.kv.accounting import CacheStats, Ledger
from kvbench.kv.layer import LayerHandle, PolicyLayer
from kvbench.kv.positions import PositionMode
from kvbench.kv.quant import codec
from kvbench.kv.rope import Rope
from kvbench.kv.rows import POS, STATE, new_meta
from kvbench.policy import Decision, KVPolicy, LayerView, Phase, rollback_reserve


class PolicyCache(Cache):
    """The cache the engine hands to the model: one PolicyLayer per decoder layer. `policy` is read for what its
    tokens carry (`token_state`, the rows a rollback needs kept), never called."""

    def __init__(self, policy: KVPolicy, num_layers: int, device: torch.device | str = "cpu",
                 positions: str = "original", rope: Rope | None = None,
                 windows: tuple[int | None, ...] | None = None, kv_quant: str | None = None) -> None:
        """`windows`: each layer's sliding window (None: full attention), from `architectures.layout`; `kv_quant`:
        the rows' quantization scheme (kvbench/kv/quant.py), None for the model's dtype."""
        row_codec = codec(kv_quant)
        if row_codec is not None and positions == "rerotate":
            raise ValueError(f"positions=rerotate turns stored keys after each eviction, which would quantize them "
                             f"again each time; with kv_quant={kv_quant} use original or naive")
        self.kv_quant = kv_quant if row_codec is not None else None
        self.position_mode = PositionMode(positions, rope)
        windows = windows or (None,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows given for {num_layers} layers")
        self.method = policy.name
        self.state_count = len(policy.token_state)
        self.ledger = Ledger()
        pin = torch.device(device).type == "cuda"  # frozen rows in pinned host memory
        handle = LayerHandle(self.ledger, tuple(policy.token_state), pin, rollback_reserve(policy),
                             self.position_mode, num_layers, self.new_meta, row_codec)
        super().__init__(layers=[PolicyLayer(handle, i, w) for i, w in enumerate(windows)])
        self.pending_positions = torch.zeros((1, 0), dtype=torch.long)
        self.pending_rotations = self.pending_positions
        self._new_meta: torch.Tensor | None = None  # this step's new rows' meta, shared by the layers (`new_meta`)

    def expect(self, position_ids: torch.Tensor, rotation_ids: torch.Tensor | None = None) -> None:
        """The next forward's tokens: their true positions and the positions the model rotates them at."""
        self.pending_positions = position_ids
        self.pending_rotations = position_ids if rotation_ids is None else rotation_ids
        self._new_meta = None

    def new_meta(self, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Meta rows [B, K, q, C] of this step's new tokens: the same in every layer (layers copy them into
        their own buffers), so built once per step instead of once per layer (~10 small ops each)."""
        meta = self._new_meta
        if meta is None or meta.shape[:3] != shape or meta.device != device:
            pos = self.pending_positions.to(device)[:, None, :].expand(shape)
            rot = self.pending_rotations.to(device)[:, None, :].expand(shape)
            meta = self._new_meta = new_meta(pos, rot, self.state_count)
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

    def next_rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions to give the model for the next tokens (true `positions`, [1, q]) under the position mode."""
        return self.position_mode.next_rotations(positions, [layer.active.n for layer in self.layers], self.method)

    def step_ended(self, settle: bool) -> None:
        """A forward is over: give idle buffer space back (`settle`: the end of a prompt, judged on the rows held now)
        and count the step's sizes."""
        for layer in self.layers:
            layer.compact(2 if settle else 4, settle)
        self.ledger.step_ended(self.full_bytes())

    # -- every layer at once (policy.AcrossLayers) ---------------------------------------------------
    def stacked_view(self, attn: torch.Tensor | None, step: int, phase: Phase) -> LayerView | None:
        """Every layer's view in one: positions and per-token state [L, B, K, n] (the state a copy: written back by
        `store_stacked_state`), `attn` as given; no keys, values or layer index. None where the layers differ in the
        tokens they hold, window or storage, or hold frozen tokens: each then needs a view of its own."""
        first = self.layers[0]
        n = first.active.n
        if any(layer.window is not None or layer.codec is not None or layer.frozen.n or layer.active.n != n
               or layer.seen != first.seen for layer in self.layers):
            return None
        meta = torch.stack([layer.active.meta[:, :, :n] for layer in self.layers])
        names = first.active.state_names
        return LayerView(layer_idx=None, num_layers=len(self.layers), keys=None, values=None,
                         positions=meta[..., POS].long(), new_tokens=first.new_tokens, seen=first.seen, attn=attn,
                         state={name: meta[..., STATE + i] for i, name in enumerate(names)}, step=step, phase=phase,
                         full_tokens=first.full_tokens())

    def store_stacked_state(self, view: LayerView) -> None:
        """Each layer's per-token state from a `stacked_view` the policy edited."""
        n = self.layers[0].active.n
        for i, name in enumerate(self.layers[0].active.state_names):
            torch._foreach_copy_([layer.active.meta[:, :, :n, STATE + i] for layer in self.layers],
                                 list(view.state[name].unbind(0)))

    def evict_stacked(self, decision: Decision) -> None:
        """A stacked view's decision (`keep` or `evict` with a leading layer axis), read on the host once for every
        layer instead of once per layer (on a GPU each read stalls the step), each layer's part then applied from
        the host lists (`PolicyLayer.evict_listed`, which reads the device no more)."""
        if decision.keep is None and decision.evict is None:
            return
        layers = self.layers
        picked = decision.evict if decision.evict is not None else ~decision.keep
        picked = picked.reshape(len(layers), *(1,) * (4 - picked.dim()), *picked.shape[1:])  # [L, B|1, K|1, *]
        if decision.evict is not None:
            listed = picked.tolist()
        else:
            listed = [[[[] for _ in range(picked.shape[2])] for _ in range(picked.shape[1])] for _ in layers]
            for i, b, h, t in picked.nonzero().tolist():
                listed[i][b][h].append(t)
        for layer, rows in zip(layers, listed, strict=True):
            layer.evict_listed(rows)

    # -- accounting (kvbench/kv/accounting.py) ---------------------------------------------------
    def full_bytes(self) -> int:
        """K/V bytes transformers' own cache would hold now (a sliding layer: its window's last w - 1 tokens)."""
        return sum(layer.full_tokens() * layer.plain_row_bytes for layer in self.layers)

    def stats(self) -> CacheStats:
        layers = self.layers
        seen = layers[0].seen if layers else 0
        return CacheStats(
            **self.ledger.figures(),
            frozen_store_bytes=sum(layer.frozen.held_bytes for layer in layers),
            full_bytes=self.full_bytes(),
            token_bytes=sum(layer.active.row_bytes() for layer in layers),
            seen_tokens=seen,
            active_tokens=[layer.active.n for layer in layers],
            frozen_tokens=[layer.frozen.n for layer in layers],
            evicted_tokens=[layer.evicted for layer in layers],
            expired_tokens=[layer.expired for layer in layers],
        )
