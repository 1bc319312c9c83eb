"""Grouped-query self-attention with per-head q/k RMSNorm, RoPE and a transformers KV cache.

Shapes (B batch, T new tokens, S = past + T keys, H query heads, K kv heads, D head_dim):
    x [B, T, hidden] -> q [B, H, T, D], k/v [B, K, T, D]
    cache.update(k, v) -> k/v [B, K, S, D]   (all keys so far; only the new ones are computed)
    softmax(q k^T / sqrt(D) + mask) v -> [B, H, T, D] -> [B, T, H*D] -> o_proj -> [B, T, hidden]

GQA: K < H kv heads, each shared by H / K query heads, shrinks the KV cache by H / K with little
quality loss. q/k norm (Qwen3): an RMSNorm over each head's D features before RoPE keeps attention
logits bounded, which stabilises training without a softcap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .config import MiniMindConfig
from .norm import RMSNorm
from .rope import apply_rotary


def build_attention_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, q_len: int,
                         past_len: int, dtype_device: torch.Tensor, kv_len: int | None = None) -> torch.Tensor | None:
    """A boolean mask [B, 1, T, S] (True = may attend), or None when plain causal attention suffices.

    - `attention_mask` [B, past + T] (1 = real token, 0 = padding): keys that are padding are hidden.
    - Packed sequences (no attention_mask, position_ids restarting at 0 inside a row): each packed
      document only sees itself: a block-diagonal causal mask built from where positions restart.
    - Several new tokens after cached ones: the causal triangle is offset by `past_len`.
    - `kv_len`: how many keys the cache hands back, when that is more than past + T (a StaticCache
      returns all its preallocated slots; the empty ones lie in the future and are masked as such).
    Query rows that see nothing (left padding) are opened fully: their outputs are never used, and a
    row of all -inf would make softmax return NaN that leaks into gradients.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        # generate() hands a ready boolean [B, 1, T, S] mask to static caches.
        if attention_mask.dtype != torch.bool:
            raise ValueError("a 4-D attention_mask must be boolean (True = may attend)")
        return attention_mask | ~attention_mask.any(-1, keepdim=True)
    device = dtype_device.device
    seen = past_len + q_len
    kv_len = seen if kv_len is None else kv_len
    packed = (attention_mask is None and past_len == 0 and q_len > 1
              and bool((position_ids[:, 1:] <= position_ids[:, :-1]).any()))
    if attention_mask is None and not packed and kv_len == seen and (past_len == 0 or q_len == 1):
        # SDPA's is_causal aligns the triangle top-left, which is only right with no past keys;
        # several new tokens after a cache (chunked prefill) need the explicit offset mask below.
        return None
    q_pos = torch.arange(past_len, seen, device=device)
    mask = q_pos[:, None] >= torch.arange(kv_len, device=device)[None, :]  # causal [T, S]
    mask = mask[None, None]
    if packed:
        doc = (position_ids == 0).cumsum(-1)  # [B, T]: document index of every token
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    if attention_mask is not None:
        keys = attention_mask[:, -seen:].bool()
        if kv_len > seen:
            keys = torch.nn.functional.pad(keys, (0, kv_len - seen))
        mask = mask & keys[:, None, None, :]
    return mask | ~mask.any(-1, keepdim=True)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, past_key_values: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *cos_sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # GQA: SDPA shares each kv head with its group of query heads itself (enable_gqa), with no
        # copy of k/v repeated H / K times; on CPU (torch 2.13) that is ~2x faster than repeating.
        # With no mask and a fresh sequence, is_causal lets SDPA pick its fused causal kernel.
        # A single new token with a cache may attend to every cached key: no mask at all.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
