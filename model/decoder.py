"""One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)).

Normalising the *input* of each sub-layer (pre-norm) leaves the residual stream untouched from the
embedding to the last layer, so gradients flow straight through deep stacks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import Attention
from .config import MiniMindConfig
from .mlp import SwiGLU
from .moe import MoE
from .norm import RMSNorm


class DecoderLayer(GradientCheckpointingLayer):
    """Returns (hidden [B, T, hidden], MoE aux loss or None). Subclassing GradientCheckpointingLayer
    lets `model.gradient_checkpointing_enable()` recompute this layer in the backward pass."""

    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe else SwiGLU(config.hidden_size, config.intermediate_size, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = hidden_states + self.resid_dropout(
            self.self_attn(self.input_layernorm(hidden_states), cos_sin, mask, past_key_values))
        out = self.mlp(self.post_attention_layernorm(h))
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        return h + out, aux
