"""PPO's training loop pieces around the math of trainer/lib/ppo.py: everything a run holds in one
object (`PPOState`), one PPO step, the held-out evaluation, and a save that `--resume` mirrors.

    state = PPOState.build(args, init, rm_path, critic_path, device, total_updates)
    state.load(ckpt)                      # --resume: weights, optimizers, schedulers, KL, statistics, RNG
    metrics = ppo_step(state, rows, args, rule_reward)
    state.save(run_dir, keep=2)           # checkpoint-<step>/: actor + tokenizer, critic/, ppo_state.pt,
                                          # rng_state_<rank>.pt (each process has its own sampler)

Everything in ppo_state.pt is tensors and plain values, loaded with `weights_only=True`.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from trainer.lib.generation import GREEDY, Sampling, generate
from trainer.lib.grading import grade
from trainer.lib.ppo import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, RunningMeanStd,
                             explained_variance, gae, masked_mean, per_token_rewards, policy_loss, token_logprobs,
                             token_values, value_loss, whiten)
from trainer.lib.reward_model import load_reward_model, reward_scores
from trainer.lib.runtime import all_gather_cat, average_gradients, barrier, is_main_process, rng_state, set_rng_state
from trainer.lib.stages import StageError, checkpoints, mark_complete

STATE_FILE = "ppo_state.pt"


@dataclass
class PPOState:
    """The four models, the two optimizers and schedulers (actor, critic), the KL coefficient, the
    reward statistics and the step: what a PPO run is at any moment."""

    actor: torch.nn.Module
    reference: torch.nn.Module
    reward_model: torch.nn.Module
    critic: torch.nn.Module
    tokenizer: Any
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    kl_ctl: FixedKLController | AdaptiveKLController
    reward_stats: RunningMeanStd
    bf16: bool = False
    step: int = 0

    @classmethod
    def build(cls, args: Any, init: Path, rm_path: Path, critic_path: Path, device: str, total_updates: int,
              bf16: bool = False) -> PPOState:
        from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

        actor = AutoModelForCausalLM.from_pretrained(init).to(device)
        reference = AutoModelForCausalLM.from_pretrained(init).to(device).requires_grad_(False)
        reward_model = load_reward_model(rm_path).to(device).requires_grad_(False)
        critic = load_reward_model(critic_path).to(device)
        for name, m in (("reward model", reward_model), ("critic", critic)):
            if m.config.vocab_size != actor.config.vocab_size:
                raise StageError(f"the {name} has vocab {m.config.vocab_size}, the actor {actor.config.vocab_size}: "
                                 f"they must share the tokenizer (train the reward model from the same sft run)")
        # Dropout off everywhere: on the first minibatch the ratio pi / pi_old must be exactly 1.
        for m in (actor, reference, reward_model, critic):
            m.eval()
        optimizers = [torch.optim.AdamW(actor.parameters(), lr=args.lr, weight_decay=args.weight_decay),
                      torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)]
        schedulers = [get_cosine_schedule_with_warmup(o, int(args.warmup_ratio * total_updates), total_updates)
                      for o in optimizers]
        kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.kl_target > 0
                  else FixedKLController(args.kl_coef))
        logger.info(f"actor/reference {init}; reward model {rm_path}; critic from {critic_path}")
        return cls(actor, reference, reward_model, critic, AutoTokenizer.from_pretrained(init), optimizers,
                   schedulers, kl_ctl, RunningMeanStd(), bf16)

    def autocast(self):
        device = next(self.actor.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=self.bf16)

    def training_state(self) -> dict[str, Any]:
        return {"step": self.step, "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers], "kl_coef": self.kl_ctl.value,
                "reward_stats": self.reward_stats.state_dict()}

    def save(self, run_dir: Path, keep: int, rank: int = 0) -> Path:
        """checkpoint-<step>/ written as .tmp-checkpoint-<step>/ and renamed when complete, so a kill
        mid-save leaves the previous checkpoint as the latest. Keeps the `keep` newest."""
        path, tmp = run_dir / f"checkpoint-{self.step}", run_dir / f".tmp-checkpoint-{self.step}"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
        if is_main_process():
            self.actor.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.critic.save_pretrained(tmp / "critic")
            torch.save(self.training_state(), tmp / STATE_FILE)
            mark_complete(tmp)
        barrier()
        if is_main_process():
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            for _, old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return path

    def load(self, ckpt: Path, rank: int = 0) -> None:
        """The mirror of `save`: weights, optimizers, schedulers, KL coefficient, reward statistics,
        step, and this process's random generators (the next sample is the one the run drew next)."""
        from transformers import AutoModelForCausalLM

        self.actor.load_state_dict(AutoModelForCausalLM.from_pretrained(ckpt).state_dict())
        self.critic.load_state_dict(load_reward_model(ckpt / "critic").state_dict())
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.kl_ctl.value = state["kl_coef"]
        self.reward_stats.load_state_dict(state["reward_stats"])
        self.step = state["step"]
        rng_file = ckpt / f"rng_state_{rank}.pt"
        if not rng_file.is_file():
            raise StageError(f"--resume: {rng_file} is missing (was the run saved with another number of processes?)")
        set_rng_state(torch.load(rng_file, weights_only=True))


def batch_for_step(rows: Sequence[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The prompts of PPO step `step` (0-based): the rows in a fresh seeded order every epoch,
    cycling, so any step can be recomputed after --resume."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, len(rows))
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        out.append(rows[order[i]])
    return out


def ppo_step(state: PPOState, rows: Sequence[dict], args: Any,
             rule_reward: Callable[..., list[float]] | None = None) -> dict[str, float]:
    """Rollout, score, advantages, then --ppo_epochs of minibatch updates. Returns this process's metrics."""
    prompts = [r["prompt"] for r in rows]

    # 1. Rollout and 2. scoring (no gradients).
    rollout = generate(state.actor, state.tokenizer, prompts, args.max_completion_length,
                       Sampling(temperature=args.temperature))
    mask = rollout.completion_mask.float()
    with torch.no_grad(), state.autocast():
        old_logp, _ = token_logprobs(state.actor, rollout, args.temperature)
        ref_logp, _ = token_logprobs(state.reference, rollout, args.temperature)
        old_values = token_values(state.critic, rollout)
    rm_scores = reward_scores(state.reward_model, state.tokenizer, prompts, rollout.texts).to(mask.device)
    score = rm_scores
    if args.normalize_reward:
        state.reward_stats.update(all_gather_cat(rm_scores))
        score = (rm_scores - state.reward_stats.mean) / max(state.reward_stats.std, 1e-6)
    metrics: dict[str, float] = {}
    if rule_reward is not None:
        rule = torch.tensor(rule_reward(prompts=prompts, completions=rollout.texts, gt=[r["gt"] for r in rows]),
                            dtype=score.dtype, device=score.device)
        score = score + args.rule_reward_weight * rule
        metrics["rule_reward"] = rule.mean().item()
    score = score - args.missing_eos_penalty * (~rollout.finished).to(score.dtype)

    # 3. Per-token rewards and 4. advantages.
    kl = KL_ESTIMATORS[args.kl_estimator](old_logp, ref_logp) * mask
    rewards = per_token_rewards(score, kl, mask, state.kl_ctl.value)
    advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask)

    # 5. PPO epochs over minibatches.
    stats = defaultdict(list)
    for _ in range(args.ppo_epochs):
        for idx in torch.randperm(len(prompts)).split(args.mini_batch_size):
            mb, m = rollout.select(idx), mask[idx]
            with state.autocast():
                logp, entropy = token_logprobs(state.actor, mb, args.temperature, with_entropy=True)
                values = token_values(state.critic, mb)
            pol = policy_loss(logp, old_logp[idx], advantages[idx], m, args.cliprange)
            vloss, vclip = value_loss(values, old_values[idx], returns[idx], m, args.cliprange_value)
            ent = masked_mean(entropy, m)
            loss = pol.loss - args.entropy_coef * ent + args.vf_coef * vloss
            for opt in state.optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(state.actor, state.critic)
            stats["grad_norm"].append(torch.nn.utils.clip_grad_norm_(state.actor.parameters(), args.max_grad_norm).item())
            torch.nn.utils.clip_grad_norm_(state.critic.parameters(), args.max_grad_norm)
            for opt, sched in zip(state.optimizers, state.schedulers):
                opt.step()
                sched.step()
            for k, v in (("policy_loss", pol.loss.item()), ("value_loss", vloss.item()),
                         ("clip_fraction", pol.clip_fraction), ("approx_kl", pol.approx_kl),
                         ("value_clip_fraction", vclip), ("entropy", ent.item())):
                stats[k].append(v)

    seq_kl = kl.sum(1)
    metrics.update({k: sum(v) / len(v) for k, v in stats.items()})
    metrics.update({
        "reward_model_score": rm_scores.mean().item(),
        "score": score.mean().item(),
        "kl": seq_kl.mean().item(),
        "non_score_reward": (-state.kl_ctl.value * seq_kl).mean().item(),
        "kl_coef": state.kl_ctl.value,
        "explained_variance": explained_variance(old_values, returns, mask),
        "completion_length": mask.sum(1).mean().item(),
        "eos_fraction": rollout.finished.float().mean().item(),
        "lr": state.schedulers[0].get_last_lr()[0],
    })
    return metrics


@torch.no_grad()
def evaluate(state: PPOState, rows: Sequence[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean reward-model score, accuracy (rows with `gt`), length."""
    prompts = [r["prompt"] for r in rows]
    texts = generate(state.actor, state.tokenizer, prompts, max_new_tokens, GREEDY, batch_size=32).texts
    scores = reward_scores(state.reward_model, state.tokenizer, prompts, texts)
    out = {"rm_score": scores.mean().item(), "completion_chars": sum(map(len, texts)) / len(texts)}
    graded = [(t, r["gt"]) for t, r in zip(texts, rows) if r["gt"]]
    if graded:
        out["accuracy"] = grade(*zip(*graded))["accuracy"]
    return out
