"""Rotary position embedding (RoPE), with optional YaRN context extension.

RoPE encodes position by *rotating* each pair of query/key features by an angle proportional to
the position: feature pair i at position m turns by m * theta_i, with theta_i = base^(-2i/d).
A dot product q_m . k_n then depends only on m - n, so attention sees relative positions.
We use the "rotate half" layout of Llama/Qwen: the pair is (x[i], x[i + d/2]), not (x[2i], x[2i+1]).

YaRN (https://arxiv.org/abs/2309.00071) stretches a model trained at length L to factor * L:
high-frequency pairs (many rotations within L) are kept as they are ("extrapolation"), low-frequency
pairs (less than one rotation within L) are slowed down by `factor` ("interpolation"), with a linear
ramp in between (set by beta_fast / beta_slow, in rotations). Attention logits are sharpened by
scaling cos/sin with `attention_factor = 0.1 * ln(factor) + 1`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i in [0, d/2). Shape [head_dim // 2]."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def yarn_inv_freq(head_dim: int, base: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN frequencies: blend of original (extrapolated) and factor-slowed (interpolated) ones."""

    def pair_index_for(num_rotations: float) -> float:
        # The pair index whose wavelength fits `num_rotations` times into the original context.
        return head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index_for(beta_fast), pair_index_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, base)
    interpolated = extrapolated / factor
    keep = 1 - ramp  # 1 for high-frequency pairs (kept), 0 for low-frequency pairs (interpolated)
    return interpolated * (1 - keep) + extrapolated * keep


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_frequencies(rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2], attention_factor) from a transformers-style `rope_parameters` dict."""
    base = rope_parameters["rope_theta"]
    if rope_parameters.get("rope_type", "default") == "default":
        return default_inv_freq(head_dim, base), 1.0
    factor = rope_parameters["factor"]
    inv_freq = yarn_inv_freq(
        head_dim, base, factor,
        rope_parameters.get("original_max_position_embeddings") or max_position_embeddings,
        rope_parameters.get("beta_fast") or 32.0, rope_parameters.get("beta_slow") or 1.0,
        rope_parameters.get("truncate", True),
    )
    attention_factor = rope_parameters.get("attention_factor") or yarn_attention_factor(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Turns position ids [batch, seq] into (cos, sin), each [batch, seq, head_dim]."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope_parameters, self.head_dim = dict(rope_parameters), head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_factor = rope_frequencies(rope_parameters, head_dim, max_position_embeddings)
        # Not saved in checkpoints: it is a pure function of the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # angles[b, m, i] = position m * theta_i, computed in fp32: positions up to 1e5 times
        # frequencies near 1 need the mantissa.
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [batch, heads, seq, head_dim] and k [batch, kv_heads, seq, head_dim] by position.

    x * cos + rotate_half(x) * sin is the 2-D rotation (a, b) -> (a cos - b sin, b cos + a sin)
    applied to every feature pair at once. cos/sin are [batch, seq, head_dim] and broadcast over heads.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
