"""Rotary position embeddings (RoPE): the cos/sin tables for a model's positions, their application to queries and
keys, and the frequency schedules of each supported scaling (default, linear, llama3, yarn), as transformers computes
them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from litllm.config import Config


class RotaryEmbedding(nn.Module):
    """cos and signed sin tables for RoPE (see apply_rope), computed per call from positions (no max-length table to
    allocate)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (T, head_dim) for apply_rope, in the rotate-half layout in which HF stores q/k: the
        two halves of each head are the two coordinates of its head_dim / 2 rotated pairs."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (T, head_dim / 2)
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x1[i], x2[i]) of x = [x1, x2] by its angle: [x1 cos - x2 sin, x2 cos + x1 sin]. The second
    term is x with its halves swapped (a roll) times the signed sin [-sin, sin]: the same products, bit for bit, as
    transformers' rotate_half (tests/test_model.py), in 4 ops instead of 7 (a decode step's q: 14 -> 8 us on CPU)."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * signed_sin


def rope_frequencies(config: Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) and the cos/sin scale, for each supported RoPE scaling."""
    with torch.device("cpu"):  # real numbers even when the model is being built on the meta device
        return _rope_frequencies(config)


def _rope_frequencies(config: Config) -> tuple[torch.Tensor, float]:
    dim, theta = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":  # positions divided by `factor`
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(inv_freq, scaling, config)
    raise ValueError(f"unknown rope_type {rope_type}")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def _yarn_frequencies(inv_freq: torch.Tensor, scaling: dict, config: Config) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen long context): interpolate low frequencies, keep high ones, ramp between; scale attention."""
    dim, base = config.head_dim, config.rope_theta
    old_context = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_seq_len / old_context

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over old_context
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate it
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)
