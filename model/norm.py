"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-feature gain.

    y = x / sqrt(mean(x^2) + eps) * weight          x: [..., dim], weight: [dim]

Unlike LayerNorm there is no mean subtraction and no bias: cheaper, and it works as well for
transformers. The statistic is computed in fp32 even under bf16 autocast, because the mean of
squares of large activations overflows or loses precision in half precision.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
