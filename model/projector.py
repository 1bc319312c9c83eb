"""The projector: Llava's two-layer MLP from the vision width to the language model's width.

    features [B, N, D_vision] -> linear_1 -> GELU -> linear_2 -> [B, N, D_lm]

Each patch feature becomes one "word" the LM reads in place of an `<image>` token. A single linear
map would only rotate and scale the ViT's space; the hidden GELU lets it bend it. Names match
`transformers.models.llava.LlavaMultiModalProjector`, so the export copies it as is.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, vision_size: int, text_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.act = nn.GELU()  # exact (erf) GELU, Llava's projector_hidden_act="gelu"
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
