"""Quantized K/V rows: each token's keys and values stored as integer codes with a scale and a minimum per group of
channels, so a row stays self-contained and the cache moves it (evicts, freezes, thaws) as bytes like any other.

A scheme `intB` (B = 8, 4 or 2 bits) quantizes each token's head vector in groups of `GROUP` channels, asymmetric
(min-max), the axis transformers' `QuantizedCache` quantizes keys and values along (per token); `intBrR` also keeps
full-precision copies of each layer's newest R tokens (`Recent`, KIVI's residual), which attention reads instead of
their quantized rows. A row is the codes
(B bits each, packed into bytes) followed by each group's scale and minimum in float16; the minimum is rounded down
and the scale up, so every value of the group lies in the range the codes span and the error of a value is at most
half its group's step (`bound`). The bytes the cache counts are exactly these rows: codes + scales + minimums.

Why not a library's tensors: optimum-quanto's and HQQ's quantized tensors hold the codes, scales and shifts of a whole
tensor as one object (quanto packs int4 codes across rows of its group view), so a single token's row could not be
evicted, moved into a hole or frozen without quantizing the layer again; kvbench's rows need each token's codes and
group parameters in that token's own row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

GROUP = 32  # channels sharing one scale and minimum (KIVI's group size)
QUANTO_GROUP = 64  # transformers' q_group_size
SCHEMES = ("int8", "int4", "int2")
PARAMS = 2  # per group: scale and minimum
PARAM_BYTES = 2  # each a float16


@dataclass(frozen=True)
class RowCodec:
    """Encode [B, K, q, D] K or V rows as uint8 rows [B, K, q, width(D)], and back; `residual`: the newest tokens
    a layer also keeps in full precision."""

    bits: int
    group: int = GROUP
    residual: int = 0
    keys_per_channel: bool = False  # KIVI: keys quantized per channel over groups of tokens (`KeyGroups`)

    @property
    def name(self) -> str:
        return ("kivi" if self.keys_per_channel else "int") + f"{self.bits}" + (
            f"r{self.residual}" if self.residual else "")

    def sized(self, *head_dims: int) -> RowCodec:
        """The codec for heads of these sizes: groups of GROUP channels, or one group per head when heads are
        smaller."""
        group = min(GROUP, *head_dims)
        bad = [d for d in head_dims if d % group]
        if bad or (group * self.bits) % 8:
            raise ValueError(f"kv_quant={self.name}: head sizes {', '.join(map(str, head_dims))} do not split into "
                             f"groups of {group} channels")
        return RowCodec(self.bits, group, self.residual, self.keys_per_channel)

    def _groups(self, d: int) -> int:
        return d // self.group

    def width(self, d: int) -> int:
        """Bytes of one encoded head vector of `d` channels: codes, then scale and minimum per group."""
        return d * self.bits // 8 + self._groups(d) * PARAMS * PARAM_BYTES

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        *lead, d = x.shape
        g = self._groups(d)
        levels = (1 << self.bits) - 1
        grouped = x.float().reshape(*lead, g, self.group)
        low = _toward(grouped.amin(-1), down=True)
        scale = _toward((grouped.amax(-1) - low.float()) / levels, down=False)
        scale = torch.where(scale > 0, scale, torch.finfo(torch.float16).tiny)
        codes = ((grouped - low.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels)
        codes = _pack(codes.to(torch.uint8).reshape(*lead, d), self.bits)
        params = torch.cat([scale, low], -1).view(torch.uint8)  # every group's scale, then every minimum
        return torch.cat([codes, params], -1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows back as [B, K, q, D] values in `dtype` (the cache's compute dtype)."""
        *lead, w = rows.shape
        per = 8 // self.bits
        d = w * 8 * self.group // (self.bits * self.group + 8 * PARAMS * PARAM_BYTES)  # inverts `width`
        g = d // self.group
        codes, params = _unpack(rows[..., : d // per], self.bits), rows[..., d // per :]
        params = params.contiguous().view(torch.float16).float()
        scale, low = params[..., :g, None], params[..., g:, None]
        values = codes.reshape(*lead, g, self.group).float() * scale + low
        return values.reshape(*lead, d).to(dtype)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """The largest error `decode(encode(x))` may have at each value of `x`: half its group's step, plus the
        float32 rounding of the arithmetic."""
        *lead, d = x.shape
        grouped = x.float().reshape(*lead, d // self.group, self.group)
        low = _toward(grouped.amin(-1), down=True).float()
        step = _toward((grouped.amax(-1) - low) / ((1 << self.bits) - 1), down=False).float()
        slack = 4 * torch.finfo(torch.float32).eps * (grouped.abs().amax(-1) + step)
        return (step / 2 + slack)[..., None].expand_as(grouped).reshape(*lead, d)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] of `bits` each as bytes [..., D * bits / 8]: neighbouring channels share a byte, the
    first in the low bits."""
    per = 8 // bits
    if per == 1:
        return codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per) << shifts).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`_pack`'s bytes back as codes [..., D, ...] (the trailing axis of `per` codes per byte to be flattened)."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    return torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], -1)


def _toward(x: torch.Tensor, down: bool) -> torch.Tensor:
    """`x` (float32) as float16, rounded toward -inf (`down`) or +inf, so the stored range covers the true one."""
    h = x.to(torch.float16)
    wrong = h.float() > x if down else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, -torch.inf if down else torch.inf)), h)


class Recent:
    """Full-precision K/V of a layer's newest `size` tokens, by position (slot = position mod size, each slot
    remembering the position it holds), laid over the decoded rows that hold those positions. A token evicted,
    frozen or rolled back keeps its slot until a newer position takes it; the slots are counted as stored."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.held = torch.full((size,), -1, dtype=torch.long)  # the position in each slot
        self.filled = 0  # slots written so far

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else (self.k.nbytes + self.v.nbytes) * self.filled // self.size

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """The new tokens' rows ([B, K, q, D], in the model's dtype) at `positions` ([q], the same in every head)."""
        keys, values, positions = keys[:, :, -self.size :], values[:, :, -self.size :], positions[-self.size :]
        if self.k is None:
            self.k = keys.new_empty((*keys.shape[:2], self.size, keys.shape[-1]))
            self.v = values.new_empty((*values.shape[:2], self.size, values.shape[-1]))
            self.held = self.held.to(keys.device)
        slots = positions % self.size
        self.k[:, :, slots], self.v[:, :, slots] = keys, values
        self.held[slots] = positions
        self.filled = min(self.size, self.filled + positions.numel())

    def overlay(self, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded `keys` and `values` [B, K, n, D] with the rows whose position ([B, K, n]) a slot holds taken from
        the slots (after the first `add`)."""
        slots = positions % self.size
        mine = (self.held[slots] == positions)[..., None]
        return tuple(torch.where(mine, held.gather(2, slots[..., None].expand(-1, -1, -1, held.shape[-1])), rows)
                     for rows, held in ((keys, self.k), (values, self.v)))


class KeyGroups:
    """KIVI's keys: quantized per channel over groups of `group` consecutive positions, asymmetric, as those tokens
    leave the full-precision window (`Recent`, which attention reads them from until then). A key row is its codes
    and its group's index (int32, four bytes; -1 while not yet quantized); each group's per-channel scales and
    minimums (float16) are held here, one table per layer, and counted as stored; a group no stored row refers to
    any more (its tokens evicted or rolled back) leaves the table at the end of the step (`compact`). `upto`: the
    first position not yet quantized."""

    def __init__(self, bits: int, group: int = GROUP) -> None:
        self.bits, self.group = bits, group
        self.scale: torch.Tensor | None = None  # [B, K, groups, D] float16
        self.low: torch.Tensor | None = None
        self.count = 0
        self.upto = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.scale is None else 2 * self.scale[:, :, : self.count].nbytes

    def width(self, d: int) -> int:
        return d * self.bits // 8 + 4

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Rows for new tokens: no codes yet, group -1 (their keys are read from the window)."""
        rows = torch.zeros((*x.shape[:-1], self.width(x.shape[-1])), dtype=torch.uint8, device=x.device)
        rows[..., -4:] = torch.tensor([-1], dtype=torch.int32).view(torch.uint8).to(x.device)
        return rows

    def quantize(self, keys: torch.Tensor) -> torch.Tensor:
        """One group's keys [B, K, group, D] as rows [B, K, group, width], their scales and minimums kept."""
        levels = (1 << self.bits) - 1
        x = keys.float()
        low = _toward(x.amin(2), down=True)
        scale = _toward((x.amax(2) - low.float()) / levels, down=False)
        scale = torch.where(scale > 0, scale, torch.finfo(torch.float16).tiny)
        codes = ((x - low.float()[:, :, None]) / scale.float()[:, :, None]).round_().clamp_(0, levels)
        if self.scale is None or self.count == self.scale.shape[2]:
            self._grow(low)
        self.scale[:, :, self.count], self.low[:, :, self.count] = scale, low
        index = torch.full((*keys.shape[:3], 1), self.count, dtype=torch.int32, device=keys.device)
        self.count += 1
        return torch.cat([_pack(codes.to(torch.uint8), self.bits), index.view(torch.uint8)], -1)

    def _grow(self, like: torch.Tensor) -> None:
        cap = max(16, self.count * 2)
        new = [like.new_zeros((*like.shape[:2], cap, like.shape[-1])) for _ in range(2)]
        if self.scale is not None:
            new[0][:, :, : self.count], new[1][:, :, : self.count] = self.scale, self.low
        self.scale, self.low = new

    @staticmethod
    def index(rows: torch.Tensor) -> torch.Tensor:
        """The group index each key row refers to ([...]; -1: not quantized yet)."""
        return rows[..., -4:].contiguous().view(torch.int32).squeeze(-1)

    def compact(self, used: torch.Tensor) -> torch.Tensor | None:
        """Drop the groups that no index in `used` (every stored key row's, any shape) refers to, keeping the others
        in order. The old-to-new index map ([count] int32, -1 for a dropped group), or None when all are in use."""
        held = torch.zeros(self.count, dtype=torch.bool, device=used.device)
        held[used[used >= 0].long()] = True
        if bool(held.all()):
            return None
        kept = held.nonzero().squeeze(-1)
        self.scale[:, :, : kept.numel()], self.low[:, :, : kept.numel()] = self.scale[:, :, kept], self.low[:, :, kept]
        renumber = torch.full((self.count,), -1, dtype=torch.int32, device=used.device)
        renumber[kept] = torch.arange(kept.numel(), dtype=torch.int32, device=used.device)
        self.count = kept.numel()
        return renumber

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        *lead, w = rows.shape
        d = (w - 4) * 8 // self.bits
        codes = _unpack(rows[..., :-4], self.bits).reshape(*lead, d).float()
        index = self.index(rows).long().clamp_(min=0)
        if self.scale is None:  # nothing quantized yet: every row is read from the window
            return codes.to(dtype)
        pick = index[..., None].expand(*lead, d)
        return (codes * self.scale.gather(2, pick).float() + self.low.gather(2, pick).float()).to(dtype)


@dataclass(frozen=True)
class QuantoCodec(RowCodec):
    """transformers' `QuantizedCache(backend="quanto")`, reproduced on rows: optimum-quanto's `MaxOptimizer` and
    affine quantizer over groups of 64 consecutive elements of the [B, H, T, D] tensor (axis 0), which are one token's
    head channels when D is a multiple of 64; scale (max - min) / (2^b - 1) and shift -min kept in the model's dtype,
    codes round((x + shift) / scale) (half to even) clamped to b bits, values scale * code - shift. The same float
    operations in the same order, so the codes are the library's. The newest tokens are held by `Block`."""

    block: int = 128  # transformers' residual_length

    @property
    def name(self) -> str:
        return f"quanto{self.bits}"

    def sized(self, *head_dims: int) -> QuantoCodec:
        bad = [d for d in head_dims if d % QUANTO_GROUP]
        if bad:
            raise ValueError(f"kv_quant={self.name} reproduces transformers' quanto cache, whose groups of "
                             f"{QUANTO_GROUP} consecutive elements of the [batch, heads, tokens, channels] tensor "
                             f"are one token's channels only where a head has a multiple of {QUANTO_GROUP}; this "
                             f"model's heads have {', '.join(map(str, sorted(set(head_dims))))}: use int{self.bits}")
        return self

    def width(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        return d * self.bits // 8 + d // self.group * PARAMS * dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        *lead, d = x.shape
        levels = (1 << self.bits) - 1
        grouped = x.reshape(*lead, d // self.group, self.group)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        scale, shift = (high - low) / levels, -low
        codes = torch.round((grouped + shift) / scale).nan_to_num_(0).clamp_(0, levels)  # 0 / 0 on a flat group
        codes = _pack(codes.to(torch.uint8).reshape(*lead, d), self.bits)
        return torch.cat([codes, torch.cat([scale, shift], -1).flatten(-2).view(torch.uint8)], -1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        *lead, w = rows.shape
        d = w * 8 * self.group // (self.bits * self.group + 8 * PARAMS * dtype.itemsize)  # inverts `width`
        codes, params = _unpack(rows[..., : d * self.bits // 8], self.bits), rows[..., d * self.bits // 8 :]
        params = params.contiguous().view(dtype).reshape(*lead, d // self.group, PARAMS)
        values = params[..., :1] * codes.reshape(*lead, d // self.group, self.group).to(dtype) - params[..., 1:]
        return values.reshape(*lead, d)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """Half a step of each value's group, plus the rounding of the model dtype's arithmetic."""
        *lead, d = x.shape
        grouped = x.reshape(*lead, d // self.group, self.group)
        step = (grouped.amax(-1) - grouped.amin(-1)) / ((1 << self.bits) - 1)
        slack = 8 * torch.finfo(x.dtype).eps * grouped.abs().amax(-1)
        return (step / 2 + slack)[..., None].expand_as(grouped).reshape(*lead, d)


class Block:
    """transformers' quanto cache's full-precision residual: the K/V of the tokens fed since the last flush, read
    instead of their rows. Unlike KIVI's sliding window (`Recent`) it is a block: the prompt is quantized at once, and
    when the tokens held plus a step's reach `size`, every stored row is quantized again from its dequantized values
    (`flush`), as transformers quantizes its whole cache again; the step's own tokens are read in full precision."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.since = 0  # the first position not yet flushed
        self.k: torch.Tensor | None = None  # [B, K, held, D]: positions since .. since + held - 1
        self.v: torch.Tensor | None = None
        self.flushed = False  # transformers quantizes the first update (the prompt) whatever its length

    @property
    def held(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The step's new tokens (the next positions); whether the step flushes after it has been attended."""
        due = not self.flushed or self.held + keys.shape[2] >= self.size
        self.k = keys if self.k is None else torch.cat([self.k, keys], 2)
        self.v = values if self.v is None else torch.cat([self.v, values], 2)
        return due

    def flushed_at(self, end: int) -> None:
        """Every position below `end` is stored quantized (the layer quantized the older rows again)."""
        self.since, self.k, self.v, self.flushed = end, None, None, True

    def drop_from(self, first: int) -> None:
        """Forget positions >= `first` (a rollback); positions fed again start the block there."""
        if first <= self.since:
            self.since, self.k, self.v = first, None, None
        elif self.k is not None:
            self.k, self.v = self.k[:, :, : first - self.since], self.v[:, :, : first - self.since]

    def overlay(self, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded `keys`, `values` [B, K, n, D] with the rows at the positions ([B, K, n]) the block holds from it."""
        if self.k is None:
            return keys, values
        at = positions - self.since
        mine = (at >= 0)[..., None]
        at = at.clamp(0, self.held - 1)[..., None]
        return tuple(torch.where(mine, held.gather(2, at.expand(-1, -1, -1, held.shape[-1])), rows)
                     for rows, held in ((keys, self.k), (values, self.v)))


SCHEME = re.compile(r"(int|kivi)(8|4|2)(?:r([1-9][0-9]*))?|quanto(4|2)")
KIVI_RESIDUAL = 128  # KIVI's full-precision window when the scheme names none


def codec(scheme: str | None) -> RowCodec | None:
    """The codec of a `kv_quant` scheme name (`int4`, `int4r128`, `kivi2`); None (or "none"): the model's dtype."""
    if scheme in (None, "none"):
        return None
    found = SCHEME.fullmatch(str(scheme))
    if found is None:
        raise ValueError(f"kv_quant={scheme!r} is not a KV quantization scheme; allowed: none, {', '.join(SCHEMES)}, "
                         "each optionally with rR to keep the newest R tokens in full precision (int4r128), and "
                         "kivi4, kivi2 (keys per channel; kivi4r64 for another window than 128), quanto4, quanto2 "
                         "(transformers' quanto QuantizedCache)")
    if found[4]:
        return QuantoCodec(int(found[4]), QUANTO_GROUP)
    kivi = found[1] == "kivi"
    residual = int(found[3] or (KIVI_RESIDUAL if kivi else 0))
    if kivi and residual < GROUP:
        raise ValueError(f"kv_quant={scheme}: KIVI quantizes keys in groups of {GROUP} tokens as they leave the "
                         f"full-precision window, so the window must hold at least {GROUP}")
    return RowCodec(int(found[2]), GROUP, residual, kivi)
