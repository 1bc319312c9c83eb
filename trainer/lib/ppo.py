"""The pieces of RL fine-tuning for language models, one small function each, in plain PyTorch.

A language model is a policy: the state is the prompt plus the tokens written so far, an action is
the next token, pi(a_t | s_t) = softmax(logits / temperature). A rollout samples a completion for
each prompt; a reward arrives at the end (a reward-model score, or a rule such as correctness).
PPO (Schulman et al. 2017) as applied to LMs (Ziegler et al. 2019, Ouyang et al. 2022) then:

    1. rollout:    completions ~ pi_old(. | prompt)                        generation.generate
    2. score:      logp_old, logp_ref, values V(s_t), final score R         token_logprobs, token_values,
                                                                            reward_model.reward_scores
    3. rewards:    r_t = -beta * KL_t  (+ R at the last completion token)  kl_k1 / kl_k3, per_token_rewards
    4. advantages: A_t by GAE over the completion tokens, whitened          gae, whiten
    5. update:     a few epochs over minibatches of the clipped surrogate  policy_loss, value_loss,
                   + clipped value loss - entropy bonus                     entropy_from_logits

Shapes: B = rollouts, C = completion tokens (right-padded), V = vocabulary. Every per-token tensor
here is in the *action frame*: index t is the t-th completion token, and `mask` [B, C] is 1 for
tokens the policy wrote (up to and including its <|im_end|>), 0 for padding after it.

The loop that strings these together (state, one step, save and resume) is trainer/lib/ppo_trainer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.lib.generation import Generation, position_ids_from_mask

# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over `dim` or everything; 0 (not NaN) where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries: sum(m (x - mean)^2) / (n - 1)."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (advantage normalisation). With
    `shift_mean=False` only the scale changes (used for rewards, whose sign carries meaning).
    Masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 = the critic predicts returns perfectly,
    0 = no better than their mean, < 0 = worse."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


# ---------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# ---------------------------------------------------------------------------------------------

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: [B, C, V], [B, C] -> [B, C] (in fp32 for accuracy)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v for p = softmax(z): [B, C, V] -> [B, C]."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log ref(a) for a ~ pi. Unbiased: E_pi[k1] = KL(pi || ref), but a single
    sample can be negative and its variance is high. (Schulman, "Approximating KL divergence".)"""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = ref(a) / pi(a), a ~ pi. Unbiased (E_pi[r] = 1, E_pi[-log r] = KL)
    and never negative (x - 1 >= log x), with lower variance than k1 when pi is close to ref."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------

def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a [B, C] mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on every completion token, plus the sequence score R at its last token:
    [B], [B, C], [B, C] -> [B, C]. The KL penalty keeps the policy near the reference so it cannot
    drift into text the reward model was never trained on (reward hacking)."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over the completion:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                 (the critic's regression target)

    [B, C] each -> advantages [B, C], returns [B, C]; zero on padding. lam = 1 gives Monte-Carlo
    returns minus V (unbiased, noisy); lam = 0 gives the one-step TD error (biased, quiet)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # Padding between a row's last token and the end passes nothing back.
        next_value = torch.where(mask[:, t] > 0, values[:, t], next_value)
        next_advantage = torch.where(mask[:, t] > 0, advantages[:, t], next_advantage)
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

@dataclass
class PolicyLossOutput:
    loss: torch.Tensor          # scalar, to minimise
    clip_fraction: float        # share of tokens where the clipped branch was taken (no gradient)
    approx_kl: float            # E[(ratio - 1) - log ratio], KL(pi_old || pi) estimated with k3


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> PolicyLossOutput:
    """Clipped surrogate objective, as a loss (negated), averaged over completion tokens:

        ratio = pi(a) / pi_old(a) = exp(logp - old_logp)
        L     = mean_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

    Where the ratio has already moved past 1 +- eps in the direction the advantage favours, the
    clipped (constant) branch wins and the gradient is zero: one rollout cannot push the policy far."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask).item()
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, float]:
    """Clipped value loss: 0.5 * mean_t max((V - G)^2, (V_clipped - G)^2), with
    V_clipped = V_old + clip(V - V_old, -eps, eps), so the critic also moves only a little per
    rollout. Returns (loss, share of tokens where the clipped term was the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).item()


# ---------------------------------------------------------------------------------------------
# Reward scaling and the KL coefficient
# ---------------------------------------------------------------------------------------------

class RunningMeanStd:
    """Mean and variance of everything seen so far, updated batch by batch (Chan et al.'s parallel
    formula): with batch mean m_b, variance v_b and count n_b,

        delta = m_b - mean;  n' = n + n_b;  mean' = mean + delta * n_b / n'
        M2'   = var * n + v_b * n_b + delta^2 * n * n_b / n';  var' = M2' / n'

    Used to scale reward-model scores to unit variance, so kl_coef and the learning rate mean the
    same thing whatever the reward model's scale."""

    def __init__(self, eps: float = 1e-4) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, eps

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        m_b, v_b = x.mean().item(), x.var(unbiased=False).item()
        delta, total = m_b - self.mean, self.count + n_b
        self.mean += delta * n_b / total
        self.var = (self.var * self.count + v_b * n_b + delta ** 2 * self.count * n_b / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class FixedKLController:
    """kl_coef stays constant."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: steer the measured KL towards `target` with a proportional controller,

        e = clip(KL / target - 1, -0.2, 0.2);   kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    More KL than wanted raises the penalty, less lowers it."""

    def __init__(self, kl_coef: float, target: float, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------
# Scoring a rollout: log-probabilities and values per completion token
# ---------------------------------------------------------------------------------------------

def token_logprobs(model, rollout: Generation, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(a_t | s_t) for every completion token [B, C] (and the entropy of pi(. | s_t) [B, C]).

    Logits at position P - 1 + t predict completion token t; only those C positions go through the
    vocabulary projection (`logits_to_keep`)."""
    C = rollout.completion_mask.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=position_ids_from_mask(rollout.attention_mask), use_cache=False,
                logits_to_keep=C + 1)
    logits = out.logits[:, :-1] / temperature  # [B, C, V]
    logp = logprobs_from_logits(logits, rollout.completion_ids)
    return logp, entropy_from_logits(logits) if with_entropy else None


def token_values(critic, rollout: Generation) -> torch.Tensor:
    """V(s_t) for every completion token [B, C]: the critic's per-position head
    (`MiniMindForSequenceClassification.token_values`) read just before token t, the state in which
    the token is chosen."""
    C = rollout.completion_mask.shape[1]
    values = critic.token_values(rollout.input_ids, rollout.attention_mask,
                                 position_ids=position_ids_from_mask(rollout.attention_mask), positions=slice(-C - 1, -1))
    return values.float()
