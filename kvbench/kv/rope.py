"""Re-rotating cached keys (the `rerotate` position mode).

RoPE rotates each pair of key channels by position * inv_freq, and rotations compose, so a key
rotated at position p moves to position p' by one more rotation of (p' - p) * inv_freq. This is the
"rotate_half" layout shared by Llama, Mistral, Qwen and Gemma in transformers.
"""

from __future__ import annotations

import torch


class Rope:
    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.float()

    @classmethod
    def from_model(cls, model) -> Rope:
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise ValueError("positions=rerotate needs one RoPE shared by every layer (no rotary_emb.inv_freq found)")
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if 2 * rotary.inv_freq.numel() != head_dim:
            raise ValueError(f"positions=rerotate needs RoPE over the whole head ({head_dim} channels); this model "
                             f"rotates {2 * rotary.inv_freq.numel()} (partial rotary)")
        return cls(rotary.inv_freq)

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys [B, K, n, d] turned by `delta` [B, K, n] positions (float64 angles, original dtype out)."""
        angles = delta.double().unsqueeze(-1) * self.inv_freq.to(keys.device).double()  # [B, K, n, d/2]
        cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
        k = keys.double()
        half = k.shape[-1] // 2
        rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return (k * cos + rotated_half * sin).to(keys.dtype)
