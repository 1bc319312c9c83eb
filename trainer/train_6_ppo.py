"""Stage 6: PPO from a reward model (RLHF as in Ziegler et al. 2019 and InstructGPT), in plain PyTorch.

trl 1.16 has no PPO trainer, and PPO is worth reading whole anyway. Four models take part:

    actor      the policy being trained                      latest dpo checkpoint (--init_from)
    reference  a frozen copy of the actor's start             the KL penalty measures drift from it
    reward     the frozen reward model of stage 5             r(prompt, answer), once per answer
    critic     a value head V(s_t), one value per token      initialised from the reward model

One step: sample an answer to each of --batch_size prompts, score it, turn the score into per-token
rewards (score at the last token, minus kl_coef * KL(actor || reference) at every token), estimate
advantages with GAE, then run --ppo_epochs passes over minibatches of the clipped surrogate loss
(actor) and clipped value loss (critic), with an entropy bonus and gradient clipping. The formulas
live in trainer/ppo.py, one function each. Held-out: the mean reward-model score (and accuracy,
where prompts have reference answers) of greedy answers before, during and after training.

    python trainer/train_6_ppo.py                                    # actor = dpo, critic/reward = reward
    python trainer/train_6_ppo.py --rule_reward correctness --rule_reward_weight 1.0
    python trainer/train_6_ppo.py --kl_target 2.0                     # adaptive KL coefficient
    torchrun --nproc_per_node 2 trainer/train_6_ppo.py               # prompts sharded, gradients averaged
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from loguru import logger
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from dataset.jsonl import load_records
from trainer.common import (CHECKPOINT_RE, StageArgs, StageError, _flag, creating_command, is_main_process,
                            latest_checkpoint, parse_args, resolve_data, resolve_init, resolve_stage_or_path, run_main,
                            stage_output, start_stage)
from trainer.ppo import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, Rollout, RunningMeanStd,
                         explained_variance, gae, generate_completions, greedy_completions, masked_mean, per_token_rewards,
                         policy_loss, score_with_reward_model, token_logprobs, token_values, value_loss, whiten)
from trainer.answers import is_correct
from trainer.rewards import load_reward


@dataclass
class PPOArgs(StageArgs):
    lr: float = _flag(1e-5, "actor peak learning rate (cosine schedule with warmup)")
    critic_lr: float = _flag(1e-4, "critic peak learning rate")
    batch_size: int = _flag(16, "prompts (= rollouts) per process per PPO step")
    mini_batch_size: int = _flag(8, "rollouts per optimizer step inside a PPO step")
    ppo_epochs: int = _flag(2, "passes over each batch of rollouts")
    logging_steps: int = _flag(1, "write TensorBoard scalars every N PPO steps")
    save_steps: int = _flag(50, "save a checkpoint every N PPO steps (and always at the end)")
    eval_steps: int = _flag(25, "held-out evaluation every N PPO steps (and before and after)")
    max_completion_length: int = _flag(64, "maximum tokens per sampled answer")
    temperature: float = _flag(1.0, "sampling temperature (log-probs use the same one)", positive=True)
    kl_coef: float = _flag(0.05, "initial coefficient of the per-token KL penalty in the reward")
    kl_target: float = _flag(0.0, "> 0: adapt kl_coef so the sequence KL approaches this (Ziegler et al.)")
    kl_horizon: int = _flag(10000, "adaptive KL horizon, in rollouts")
    kl_estimator: str = _flag("k1", "per-token KL estimator in the reward", choices=tuple(KL_ESTIMATORS))
    gamma: float = _flag(1.0, "discount")
    lam: float = _flag(0.95, "GAE lambda")
    cliprange: float = _flag(0.2, "policy ratio clip epsilon")
    cliprange_value: float = _flag(0.2, "value clip epsilon")
    vf_coef: float = _flag(0.5, "weight of the value loss")
    entropy_coef: float = _flag(0.001, "weight of the entropy bonus")
    normalize_reward: bool = _flag(True, "scale reward-model scores by running mean/std (--no-normalize_reward: raw)")
    missing_eos_penalty: float = _flag(1.0, "subtracted from the score of answers cut off before <|im_end|>")
    reward_model: str | None = _flag(None, "reward model: a stage name or model dir (default: latest reward checkpoint)")
    critic_from: str | None = _flag(None, "critic initialisation (default: the reward model)")
    rule_reward: str | None = _flag(None, "also add a rule reward: correctness, format or package.module:function")
    rule_reward_weight: float = _flag(1.0, "weight of --rule_reward")
    max_eval_prompts: int = _flag(64, "held-out prompts for the reward-model score")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): gloo on CPU, nccl on GPUs
# ---------------------------------------------------------------------------------------------

def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world_size); joins the process group when torchrun started several processes.
    `run_main` closes it after a successful run, as for every stage."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_mean(x: torch.Tensor | float) -> float:
    """Mean of a scalar over processes."""
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process (for the reward statistics)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(*models: torch.nn.Module) -> None:
    """Data parallelism by hand: after backward, every process holds the mean gradient."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for m in models:
        for p in m.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

def reward_model_path(args: PPOArgs) -> Path:
    out_dir = Path(args.out_dir)
    if args.reward_model:
        return resolve_stage_or_path(args.reward_model, out_dir, flag="--reward_model")
    path = stage_output(out_dir, "reward")
    if path is None:
        raise StageError(f"PPO needs a reward model, and {out_dir / 'reward'} has no checkpoint yet. "
                         f"Create it with: {creating_command('reward', out_dir)} (or pass --reward_model DIR)")
    return path


def load_models(args: PPOArgs, init: Path, rm_path: Path, device: str):
    actor = AutoModelForCausalLM.from_pretrained(init).to(device)
    reference = AutoModelForCausalLM.from_pretrained(init).to(device).requires_grad_(False)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1).to(device).requires_grad_(False)
    critic_path = resolve_stage_or_path(args.critic_from, Path(args.out_dir), flag="--critic_from") if args.critic_from else rm_path
    critic = AutoModelForSequenceClassification.from_pretrained(critic_path, num_labels=1).to(device)
    for name, m in (("reward model", reward_model), ("critic", critic)):
        if m.config.vocab_size != actor.config.vocab_size:
            raise StageError(f"the {name} has vocab {m.config.vocab_size}, the actor {actor.config.vocab_size}: "
                             f"they must share the tokenizer (train the reward model from the same sft run)")
    # Dropout off everywhere: on the first minibatch the ratio pi / pi_old must be exactly 1.
    for m in (actor, reference, reward_model, critic):
        m.eval()
    logger.info(f"actor/reference {init}; reward model {rm_path}; critic from {critic_path}")
    return actor, reference, reward_model, critic


def prompt_rows(path: Path, skip_bad_lines: bool) -> list[dict]:
    return [{"prompt": r["prompt"], "gt": r["gt"]} for r in load_records(path, "rl", skip_bad_lines=skip_bad_lines)]


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


def select(rollout: Rollout, idx: torch.Tensor) -> Rollout:
    """The rollouts at `idx` (a minibatch)."""
    return Rollout(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.completion_mask[idx],
                   rollout.finished[idx], rollout.prompt_length, [rollout.texts[i] for i in idx.tolist()])


# ---------------------------------------------------------------------------------------------
# Evaluation, checkpoints
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(actor, reward_model, tokenizer, rows: Sequence[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean reward-model score, accuracy (rows with `gt`), length."""
    prompts = [r["prompt"] for r in rows]
    texts = greedy_completions(actor, tokenizer, prompts, max_new_tokens)
    scores = score_with_reward_model(reward_model, tokenizer, prompts, texts)
    out = {"rm_score": scores.mean().item(), "completion_chars": sum(map(len, texts)) / len(texts)}
    graded = [(t, r["gt"]) for t, r in zip(texts, rows) if r["gt"]]
    if graded:
        out["accuracy"] = sum(is_correct(t, g) for t, g in graded) / len(graded)
    return out


def save_checkpoint(run_dir: Path, step: int, actor, critic, tokenizer, state: dict, total_limit: int) -> Path:
    """checkpoint-<step>/: the actor (a loadable model dir with the tokenizer), critic/, ppo_state.pt
    (optimizers, schedulers, KL coefficient, reward statistics). Keeps the `total_limit` newest."""
    path = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    actor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    critic.save_pretrained(tmp / "critic")
    torch.save(state, tmp / "ppo_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    found = sorted((int(m[1]), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    for _, old in found[:-total_limit] if total_limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# One PPO step
# ---------------------------------------------------------------------------------------------

def ppo_step(args: PPOArgs, rows: Sequence[dict], models, tokenizer, optimizers, schedulers, kl_ctl, reward_stats,
             rule_reward, autocast) -> dict[str, float]:
    """Rollout, score, advantages, then --ppo_epochs of minibatch updates. Returns local metrics."""
    actor, reference, reward_model, critic = models
    prompts = [r["prompt"] for r in rows]

    # 1. Rollout and 2. scoring (no gradients).
    rollout = generate_completions(actor, tokenizer, prompts, args.max_completion_length, args.temperature)
    mask = rollout.completion_mask.float()
    with torch.no_grad(), autocast():
        old_logp, _ = token_logprobs(actor, rollout, args.temperature)
        ref_logp, _ = token_logprobs(reference, rollout, args.temperature)
        old_values = token_values(critic, rollout)
    rm_scores = score_with_reward_model(reward_model, tokenizer, prompts, rollout.texts).to(mask.device)
    score = rm_scores
    if args.normalize_reward:
        reward_stats.update(all_gather_cat(rm_scores))
        score = (rm_scores - reward_stats.mean) / max(reward_stats.std, 1e-6)
    metrics: dict[str, float] = {}
    if rule_reward is not None:
        rule = torch.tensor(rule_reward(prompts=prompts, completions=rollout.texts, gt=[r["gt"] for r in rows]),
                            dtype=score.dtype, device=score.device)
        score = score + args.rule_reward_weight * rule
        metrics["rule_reward"] = rule.mean().item()
    score = score - args.missing_eos_penalty * (~rollout.finished).to(score.dtype)

    # 3. Per-token rewards and 4. advantages.
    kl = KL_ESTIMATORS[args.kl_estimator](old_logp, ref_logp) * mask
    rewards = per_token_rewards(score, kl, mask, kl_ctl.value)
    advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask)

    # 5. PPO epochs over minibatches.
    stats = defaultdict(list)
    B = len(prompts)
    for _ in range(args.ppo_epochs):
        for idx in torch.randperm(B).split(args.mini_batch_size):
            mb = select(rollout, idx)
            m = mask[idx]
            with autocast():
                logp, entropy = token_logprobs(actor, mb, args.temperature, with_entropy=True)
                values = token_values(critic, mb)
            pol = policy_loss(logp, old_logp[idx], advantages[idx], m, args.cliprange)
            vloss, vclip = value_loss(values, old_values[idx], returns[idx], m, args.cliprange_value)
            ent = masked_mean(entropy, m)
            loss = pol.loss - args.entropy_coef * ent + args.vf_coef * vloss
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(actor, critic)
            stats["grad_norm"].append(torch.nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm).item())
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
            stats["policy_loss"].append(pol.loss.item())
            stats["value_loss"].append(vloss.item())
            stats["clip_fraction"].append(pol.clip_fraction)
            stats["approx_kl"].append(pol.approx_kl)
            stats["value_clip_fraction"].append(vclip)
            stats["entropy"].append(ent.item())

    seq_kl = kl.sum(1)
    metrics.update({k: sum(v) / len(v) for k, v in stats.items()})
    metrics.update({
        "reward_model_score": rm_scores.mean().item(),
        "score": score.mean().item(),
        "kl": seq_kl.mean().item(),
        "non_score_reward": (-kl_ctl.value * seq_kl).mean().item(),
        "kl_coef": kl_ctl.value,
        "explained_variance": explained_variance(old_values, returns, mask),
        "completion_length": mask.sum(1).mean().item(),
        "eos_fraction": rollout.finished.float().mean().item(),
        "lr": schedulers[0].get_last_lr()[0],
    })
    return metrics


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(PPOArgs, argv, __doc__)
    if args.mini_batch_size > args.batch_size or args.batch_size % args.mini_batch_size:
        raise StageError(f"--batch_size {args.batch_size} must be a multiple of --mini_batch_size {args.mini_batch_size}")
    run = start_stage("ppo", args)
    rank, world = init_distributed(run.precision.device)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if run.precision.device == "cuda" else "cpu"
    init = resolve_init("ppo", args)
    rm_path = reward_model_path(args)
    data = resolve_data(args, "rl")
    rule_reward = None
    if args.rule_reward:
        try:
            rule_reward = load_reward(args.rule_reward)
        except ValueError as e:
            raise StageError(str(e)) from e

    rows = prompt_rows(data.train, args.skip_bad_lines)
    if data.eval is not None:
        eval_rows = prompt_rows(data.eval, args.skip_bad_lines)
    else:
        n_eval = min(args.max_eval_prompts, max(1, len(rows) // 10))
        rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    eval_rows = eval_rows[: args.max_eval_prompts]
    shard = rows[rank::world]
    if not shard:
        raise StageError(f"{data.train}: no prompts for process {rank} of {world}")
    steps_per_epoch = max(1, len(shard) // args.batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(steps_per_epoch * args.epochs))
    updates_per_step = args.ppo_epochs * (args.batch_size // args.mini_batch_size)
    logger.info(f"{len(rows)} prompts ({len(shard)} on each of {world} processes), {len(eval_rows)} held out; "
                f"{total_steps} PPO steps of {args.batch_size * world} rollouts, {updates_per_step} updates each")

    tokenizer = AutoTokenizer.from_pretrained(init)
    models = load_models(args, init, rm_path, device)
    actor, reference, reward_model, critic = models
    torch.manual_seed(args.seed + rank)  # different samples on every process
    optimizers = [torch.optim.AdamW(actor.parameters(), lr=args.lr, weight_decay=args.weight_decay),
                  torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)]
    n_updates = total_steps * updates_per_step
    schedulers = [get_cosine_schedule_with_warmup(o, int(args.warmup_ratio * n_updates), n_updates) for o in optimizers]
    kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.kl_target > 0
              else FixedKLController(args.kl_coef))
    reward_stats = RunningMeanStd()
    use_bf16 = run.precision.bf16

    def autocast():
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                              enabled=use_bf16)

    start = 0
    if args.resume:
        ckpt = latest_checkpoint(run.dir)
        if ckpt is None or not (ckpt / "ppo_state.pt").is_file():
            raise StageError(f"--resume: no PPO checkpoint in {run.dir} to resume from; run without --resume first")
        actor.load_state_dict(AutoModelForCausalLM.from_pretrained(ckpt).state_dict())
        critic.load_state_dict(AutoModelForSequenceClassification.from_pretrained(ckpt / "critic").state_dict())
        state = torch.load(ckpt / "ppo_state.pt", weights_only=False)
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        kl_ctl.value = state["kl_coef"]
        reward_stats.load_state_dict(state["reward_stats"])
        start = state["step"]
        logger.info(f"resuming from {ckpt} at step {start}")

    writer = SummaryWriter(str(run.dir / "runs")) if is_main_process() else None
    history: list[tuple[int, dict]] = []

    def run_eval(step: int) -> None:
        if writer is None or not eval_rows:
            return
        result = evaluate(actor, reward_model, tokenizer, eval_rows, args.max_completion_length)
        history.append((step, result))
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, step)
        writer.flush()
        logger.info(f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    run_eval(start)
    last_metrics: dict[str, float] = {}
    t0 = time.time()
    for step in range(start, total_steps):
        batch = batch_for_step(shard, step, args.batch_size, args.seed)
        local = ppo_step(args, batch, models, tokenizer, optimizers, schedulers, kl_ctl, reward_stats, rule_reward, autocast)
        metrics = {k: all_mean(v) for k, v in sorted(local.items())}
        kl_ctl.update(metrics["kl"], args.batch_size * world)
        last_metrics = metrics
        done = step + 1
        if writer is not None and (done % args.logging_steps == 0 or done == total_steps or done == 1):
            for k, v in metrics.items():
                writer.add_scalar(f"train/{k}", v, done)
            logger.info(f"step {done}/{total_steps} ({(time.time() - t0) / (done - start):.1f} s/step): "
                        + ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reward_model_score", "kl", "policy_loss",
                                                                    "value_loss", "clip_fraction", "entropy",
                                                                    "completion_length")))
        if done % args.save_steps == 0 or done == total_steps:
            if is_main_process():
                state = {"step": done, "optimizers": [o.state_dict() for o in optimizers],
                         "schedulers": [s.state_dict() for s in schedulers], "kl_coef": kl_ctl.value,
                         "reward_stats": reward_stats.state_dict(), "args": asdict(args)}
                path = save_checkpoint(run.dir, done, actor, critic, tokenizer, state, args.save_total_limit)
                logger.info(f"saved {path}")
            if dist.is_initialized():
                dist.barrier()
        if done % args.eval_steps == 0 and done != total_steps:
            run_eval(done)
    run_eval(total_steps)

    if writer is not None:
        writer.close()
        if len(history) >= 2:
            (s0, before), (s1, after) = history[0], history[-1]
            acc = (f"; accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
                   if "accuracy" in before and "accuracy" in after else "")
            logger.info(f"held-out greedy reward-model score {before['rm_score']:.3f} (step {s0}) -> "
                        f"{after['rm_score']:.3f} (step {s1}){acc}; final KL {last_metrics.get('kl', float('nan')):.3f}")
    return run.dir / f"checkpoint-{total_steps}"


if __name__ == "__main__":
    run_main(main)
