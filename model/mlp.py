"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

x [B, T, hidden] -> gate, up [B, T, intermediate] -> product -> down -> [B, T, hidden].
The gate decides, feature by feature, how much of `up` passes: a learned, smooth switch. Three
matrices instead of two, so the intermediate size is ~8/3 hidden (not 4x) for the same compute.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
