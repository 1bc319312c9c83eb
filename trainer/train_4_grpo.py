"""Stage 4: GRPO, reinforcement learning from verifiable rewards (DeepSeekMath, Shao et al. 2024).

For each prompt the policy samples a *group* of --num_generations answers; each answer is scored by
rule rewards (is the final answer right? is it stated in the expected format?). The advantage of
an answer is its reward relative to its own group, A_i = (r_i - mean(r)) / std(r): no critic is
needed, the group is the baseline. The policy then takes a PPO-style clipped step towards the
better-than-average answers, with a KL penalty (--beta) keeping it near the starting model.
A group where every answer scores the same teaches nothing, which is why RL prompts must sit at
the edge of the model's ability. trl's GRPOTrainer does the work; this script picks the data,
rewards and CPU-safe settings, and measures held-out greedy accuracy before and after.

    python trainer/train_4_grpo.py                                   # from the latest dpo checkpoint, demo prompts
    python trainer/train_4_grpo.py --init_from sft --loss_type grpo --beta 0.0
    python trainer/train_4_grpo.py --data ../shared/data/rlaif_gsm8k.jsonl --reward correctness --reward format
    python trainer/train_4_grpo.py --reward correctness,my_rewards:length_penalty --reward_weights 1,0.1
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import trainer.lib.quiet  # noqa: F401, I001  (first: silences a bitsandbytes warning trl's import triggers)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from trainer.lib.callbacks import HeldOutMetricCallback, attach_callbacks
from trainer.lib.data import resolve_data, rl_rows, train_and_eval
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, merge_repeated_flag, parse_args)
from trainer.lib.generation import REPLY_TOKENS
from trainer.lib.grading import build_rewards, needs_gt
from trainer.lib.metrics import answer_accuracy
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.runtime import run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, resume_checkpoint

# GRPOConfig.loss_type values in trl 1.16 (see its docstring): how token losses are aggregated.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


@dataclass
class GRPOArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags):
    lr: float = flag(5e-5, "peak learning rate (cosine schedule with warmup)")
    max_steps: int = flag(300, "GRPO steps (each: batch_size / num_generations prompts); -1 = --epochs over the prompts")
    batch_size: int = flag(32, "completions per device per step (a multiple of --num_generations)")
    epochs: float = flag(1.0, "passes over the prompts")
    logging_steps: int = flag(5, "log rewards/KL/lengths every N steps")
    save_steps: int = flag(100, "save a checkpoint every N steps (and always at the end)")
    eval_steps: int = flag(50, "measure held-out greedy accuracy every N steps (0 = only before and after)")
    num_generations: int = flag(8, "group size G: completions sampled per prompt")
    beta: float = flag(0.0, "KL coefficient towards the starting model (0 = no reference model, faster)")
    loss_type: str = flag("dapo", "how token losses are aggregated (trl's GRPOConfig.loss_type)", choices=LOSS_TYPES)
    epsilon: float = flag(0.2, "PPO clip range for the importance ratio")
    max_completion_length: int = flag(REPLY_TOKENS, "maximum tokens per sampled completion")
    temperature: float = flag(0.7, "sampling temperature for the group (lower = fewer garbled answers, less variety)",
                              positive=True)
    reward: str = flag("correctness,format", "reward functions: comma list (or repeat the flag) of "
                                             "correctness, format, or package.module:function")
    reward_weights: str | None = flag(None, "comma list of weights, one per reward (default: all 1)")
    max_eval_prompts: int = flag(200, "held-out prompts for greedy accuracy")


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> GRPOTrainer:
    args = parse_args(GRPOArgs, merge_repeated_flag(argv, "--reward"), __doc__)
    run = start_stage("grpo", args)
    init = resolve_init("grpo", args.out_dir, args.init_from)
    data = resolve_data(args, "rl")
    try:
        reward_funcs, reward_weights = build_rewards(args.reward, args.reward_weights)
    except ValueError as e:
        raise StageError(str(e)) from e

    # A prompt without `gt` scores 0 under correctness in every sample: a zero advantage, a wasted group.
    need_gt = needs_gt(reward_funcs)
    train_rows, eval_rows = train_and_eval(data, lambda p: rl_rows(p, args.skip_bad_lines, need_gt),
                                           args.max_eval_prompts)
    eval_rows = [r for r in eval_rows if r["gt"]]
    graded = sum(bool(r["gt"]) for r in train_rows)
    if not train_rows:
        raise StageError(f"{data.train}: no RL prompts to train on")
    logger.info(f"{len(train_rows)} prompts ({graded} with a reference answer), {len(eval_rows)} held out; "
                f"rewards {[getattr(f, '__name__', str(f)) for f in reward_funcs]} weights {reward_weights or 'all 1'}")
    if args.batch_size % args.num_generations:
        raise StageError(f"--batch_size {args.batch_size} must be a multiple of --num_generations {args.num_generations}")

    tokenizer = AutoTokenizer.from_pretrained(init)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(init, dtype=run.precision.dtype)
    extra = {"importance_sampling_level": "sequence"} if args.loss_type == "luspo" else {}
    config = GRPOConfig(
        **trainer_kwargs(args, run, has_eval=False, include_num_input_tokens_seen=False),
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_k=0,
        beta=args.beta,
        loss_type=args.loss_type,
        epsilon=args.epsilon,
        reward_weights=reward_weights,
        use_vllm=False,
        log_completions=False,
        **extra,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    prompts, golds = [r["prompt"] for r in eval_rows], [r["gt"] for r in eval_rows]
    heldout = HeldOutMetricCallback(
        trainer, "eval/accuracy", every=args.eval_steps,
        measure=lambda m: (answer_accuracy(m, tokenizer, prompts, golds, args.max_completion_length)["accuracy"]
                           if prompts else None))
    attach_callbacks(trainer, heldout, perplexity=False)
    trainer.train(resume_from_checkpoint=resume_checkpoint(run.dir, args.resume))

    if len(heldout.history) >= 2:
        report = StageReport(run, resume=args.resume)
        report.before("accuracy", heldout.history[0][1], higher_is_better=True, n=len(prompts))
        report.after("accuracy", heldout.history[-1][1])
        report.save(trainer.state.global_step, **trainer_seen(trainer))
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_5_reward.py  (reward model for PPO)")
    return trainer


if __name__ == "__main__":
    run_main(main)
