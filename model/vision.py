"""A small vision transformer (ViT) whose math is SigLIP's, so a trained one exports to stock transformers.

    pixels [B, 3, S, S] --patch conv--> [B, N, D] + learned positions --L pre-norm blocks--> [B, N, D]
    N = (S / patch_size)^2 patches, each a `patch_size`^2 square seen as one "word".

A block is the transformer encoder block without a causal mask (every patch sees every patch):
    x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x)),  MLP = fc2(gelu_tanh(fc1(x)))
The names (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, `post_layernorm`...)
and the config fields are SigLIP's (`transformers.SiglipVisionConfig`), so `model/convert_vlm.py`
copies the weights into a `SiglipVisionModel` with no arithmetic.

Which output the VLM reads: `hidden_states[-1]`, the last block's output *before* the final norm,
as Llava does with SigLIP (`vision_feature_layer=-1`); `last_hidden_state` (after the final norm)
is what SigLIP's own image-text training used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class VisionConfig(PreTrainedConfig):
    """The ViT's numbers; field names match `transformers.SiglipVisionConfig`."""

    model_type = "minimind_vision"

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_channels: int = 3
    image_size: int = 48
    patch_size: int = 8
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"VisionConfig: hidden_act must be 'gelu_pytorch_tanh' (SigLIP's) or 'gelu', "
                             f"got {self.hidden_act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig: image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"VisionConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    """A conv with kernel = stride = patch_size is a linear map of each non-overlapping patch;
    a learned vector per position tells the blocks where each patch was."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], patches in reading order
        return x + self.position_embedding.weight[None, : x.shape[1]]


class VisionAttention(nn.Module):
    """Multi-head self-attention over patches: softmax(q k^T / sqrt(d)) v, no mask, with biases."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        # SigLIP's "gelu_pytorch_tanh": the tanh approximation of GELU.
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(PreTrainedModel):
    """pixel_values [B, C, S, S] -> hidden_states (embeddings, then each block: L + 1 tensors [B, N, D])
    and last_hidden_state = final LayerNorm of the last block's output."""

    config_class = VisionConfig
    config: VisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    _no_split_modules = ["VisionBlock"]

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(config)
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = True,
                **kwargs: Any) -> BaseModelOutputWithPooling:
        x = self.embeddings(pixel_values)
        hidden_states = [x]
        for block in self.encoder.layers:
            x = block(x)
            hidden_states.append(x)
        return BaseModelOutputWithPooling(last_hidden_state=self.post_layernorm(x),
                                          hidden_states=tuple(hidden_states))
