"""Mixture of experts: a router sends each token to its top-k of E SwiGLU experts.

For token x: p = softmax(W_router x) over E experts; keep the k largest (renormalised to sum to 1
when `norm_topk_prob`); output = sum over the chosen experts of p_e * expert_e(x). Parameters grow
with E, compute only with k.

Left alone, a router collapses onto a few experts. The load-balancing loss (Switch Transformer)
    aux = E * sum_e f_e * P_e
with f_e the share of routed (token, slot) pairs that went to expert e and P_e the mean router
probability of e, is 1.0 when routing is uniform and grows as it concentrates. f is a count (no
gradient); the gradient reaches the router through P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniMindConfig
from .mlp import SwiGLU


def load_balancing_loss(router_probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """router_probs [N, E] (softmax), top_idx [N, k] -> scalar aux loss (1.0 when balanced)."""
    f = F.one_hot(top_idx, num_experts).float().mean(dim=(0, 1))  # [E], sums to 1
    p = router_probs.float().mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


class MoE(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size, config.dropout) for _ in range(self.num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (y [B, T, hidden], aux loss scalar)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, hidden]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [N, E]
        top_p, top_idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        top_p = top_p.to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_idx == e)  # which tokens chose e, and in which of their k slots
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * top_p[token, slot, None])
        return y.reshape(shape), load_balancing_loss(probs, top_idx, self.num_experts)
