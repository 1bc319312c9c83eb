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
live in trainer/lib/ppo.py, one function each; the step and the saved state in trainer/lib/ppo_trainer.py.
Held-out: the mean reward-model score (and accuracy, where prompts have reference answers) of
greedy answers before, during and after training.

    python trainer/train_6_ppo.py                                    # actor = dpo, critic/reward = reward
    python trainer/train_6_ppo.py --rule_reward correctness --rule_reward_weight 1.0
    python trainer/train_6_ppo.py --kl_target 2.0                     # adaptive KL coefficient
    torchrun --nproc_per_node 2 trainer/train_6_ppo.py               # prompts sharded, gradients averaged
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch.utils.tensorboard import SummaryWriter

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from trainer.lib.data import resolve_data, rl_rows, train_and_eval
from trainer.lib.flags import CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags, flag, parse_args
from trainer.lib.generation import REPLY_TOKENS
from trainer.lib.grading import load_reward, needs_gt
from trainer.lib.ppo import KL_ESTIMATORS
from trainer.lib.ppo_trainer import STATE_FILE, PPOState, batch_for_step, evaluate, ppo_step
from trainer.lib.report import StageReport
from trainer.lib.runtime import all_mean, init_distributed, is_main_process, run_main, start_stage
from trainer.lib.stages import StageError, resolve_init, resolve_model, resume_checkpoint


@dataclass
class PPOArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags):
    lr: float = flag(3e-5, "actor peak learning rate (cosine schedule with warmup)")
    max_steps: int = flag(100, "PPO steps; -1 = --epochs over the prompts")
    critic_lr: float = flag(1e-4, "critic peak learning rate")
    batch_size: int = flag(8, "prompts per process per PPO step")
    samples_per_prompt: int = flag(4, "rollouts sampled for each prompt (batch_size x this = rollouts per step)",
                                   positive=True)
    mini_batch_size: int = flag(8, "rollouts per optimizer step inside a PPO step")
    ppo_epochs: int = flag(2, "passes over each batch of rollouts")
    logging_steps: int = flag(1, "write TensorBoard scalars every N PPO steps")
    save_steps: int = flag(50, "save a checkpoint every N PPO steps (and always at the end)")
    eval_steps: int = flag(20, "held-out evaluation every N PPO steps (and before and after)")
    max_completion_length: int = flag(REPLY_TOKENS, "maximum tokens per sampled answer")
    temperature: float = flag(0.7, "sampling temperature (log-probs use the same one)", positive=True)
    kl_coef: float = flag(0.05, "initial coefficient of the per-token KL penalty in the reward")
    kl_target: float = flag(0.0, "> 0: adapt kl_coef so the sequence KL approaches this (Ziegler et al.)")
    kl_horizon: int = flag(10000, "adaptive KL horizon, in rollouts")
    kl_estimator: str = flag("k1", "per-token KL estimator in the reward", choices=tuple(KL_ESTIMATORS))
    gamma: float = flag(1.0, "discount")
    lam: float = flag(0.95, "GAE lambda")
    cliprange: float = flag(0.2, "policy ratio clip epsilon")
    cliprange_value: float = flag(0.2, "value clip epsilon")
    vf_coef: float = flag(0.5, "weight of the value loss")
    entropy_coef: float = flag(0.001, "weight of the entropy bonus")
    normalize_reward: bool = flag(True, "scale reward-model scores by running mean/std (--no-normalize_reward: raw)")
    missing_eos_penalty: float = flag(1.0, "subtracted from the score of answers cut off before <|im_end|>")
    reward_model: str = flag("reward", "reward model: a stage name (its latest checkpoint) or a model dir")
    critic_from: str | None = flag(None, "critic initialisation (default: the reward model)")
    rule_reward: str | None = flag(None, "also add a rule reward: correctness, format or package.module:function")
    rule_reward_weight: float = flag(1.0, "weight of --rule_reward")
    max_eval_prompts: int = flag(200, "held-out prompts for the reward-model score and accuracy")


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(PPOArgs, argv, __doc__)
    rollouts = args.batch_size * args.samples_per_prompt
    if args.mini_batch_size > rollouts or rollouts % args.mini_batch_size:
        raise StageError(f"--batch_size {args.batch_size} x --samples_per_prompt {args.samples_per_prompt} = {rollouts} "
                         f"rollouts must be a multiple of --mini_batch_size {args.mini_batch_size}")
    run = start_stage("ppo", args)
    rank, world = init_distributed(run.precision.device)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if run.precision.device == "cuda" else "cpu"
    init = resolve_init("ppo", args.out_dir, args.init_from)
    rm_path = resolve_model(args.reward_model, run.out_dir, "reward", flag="--reward_model")
    critic_path = resolve_model(args.critic_from, run.out_dir, "any", flag="--critic_from") if args.critic_from else rm_path
    try:
        rule_reward = load_reward(args.rule_reward) if args.rule_reward else None
    except ValueError as e:
        raise StageError(str(e)) from e

    need_gt = needs_gt([rule_reward])
    rows, eval_rows = train_and_eval(resolve_data(args, "rl"), lambda p: rl_rows(p, args.skip_bad_lines, need_gt),
                                     args.max_eval_prompts)
    shard = rows[rank::world]
    if not shard:
        raise StageError(f"no RL prompts for process {rank} of {world}")
    steps_per_epoch = max(1, len(shard) // args.batch_size)
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(steps_per_epoch * args.epochs))
    updates_per_step = args.ppo_epochs * (rollouts // args.mini_batch_size)
    logger.info(f"{len(rows)} prompts ({len(shard)} on each of {world} processes), {len(eval_rows)} held out; "
                f"{total_steps} PPO steps of {rollouts * world} rollouts ({args.batch_size * world} prompts x "
                f"{args.samples_per_prompt}), {updates_per_step} updates each")

    state = PPOState.build(args, init, rm_path, critic_path, device, total_steps * updates_per_step,
                           bf16=run.precision.bf16)
    torch.manual_seed(args.seed + rank)  # different samples on every process (--resume restores the saved RNG)
    ckpt = resume_checkpoint(run.dir, args.resume, needs=STATE_FILE)
    if ckpt is not None:
        state.load(ckpt, rank)

    writer = SummaryWriter(str(run.dir / "runs")) if is_main_process() else None
    history: list[tuple[int, dict]] = []

    def run_eval(step: int) -> None:
        if writer is None or not eval_rows:
            return
        result = evaluate(state, eval_rows, args.max_completion_length)
        history.append((step, result))
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, step)
        writer.flush()
        logger.info(f"step {step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    run_eval(state.step)
    report = StageReport(run, resume=args.resume)
    if history:
        for k in ("rm_score", "accuracy"):
            if k in history[0][1]:
                report.before(k, history[0][1][k], higher_is_better=True,
                              n=len(eval_rows) if k == "accuracy" else None)
    t0, start = time.time(), state.step
    while state.step < total_steps:
        prompts = batch_for_step(shard, state.step, args.batch_size, args.seed)
        local = ppo_step(state, [r for r in prompts for _ in range(args.samples_per_prompt)], args, rule_reward)
        metrics = {k: all_mean(v) for k, v in sorted(local.items())}
        state.kl_ctl.update(metrics["kl"], rollouts * world)
        state.step += 1
        done = state.step
        if writer is not None and (done % args.logging_steps == 0 or done == total_steps or done == 1):
            for k, v in metrics.items():
                writer.add_scalar(f"train/{k}", v, done)
            logger.info(f"step {done}/{total_steps} ({(time.time() - t0) / (done - start):.1f} s/step): "
                        + ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reward_model_score", "kl", "policy_loss",
                                                                    "value_loss", "clip_fraction", "entropy",
                                                                    "completion_length")))
        if done % args.save_steps == 0 or done == total_steps:
            path = state.save(run.dir, args.save_total_limit, rank)
            if is_main_process():
                logger.info(f"saved {path}")
        if done % args.eval_steps == 0 and done != total_steps:
            run_eval(done)
    run_eval(total_steps)

    if writer is not None:
        writer.close()
        for k in report.metrics:
            report.after(k, history[-1][1][k])
        report.save(total_steps, samples=total_steps * rollouts * world)  # rollouts
    return run.dir / f"checkpoint-{total_steps}"


if __name__ == "__main__":
    run_main(main)
