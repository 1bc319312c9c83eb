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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from dataset.jsonl import load_records
from trainer.callbacks import attach_callbacks
from trainer.common import (StageArgs, StageError, _flag, latest_checkpoint, parse_args, resolve_data, resolve_init,
                            resume_checkpoint, run_main, start_stage, trainer_kwargs)
from trainer.ppo import HeldOutMetricCallback, greedy_accuracy
from trainer.rewards import load_reward, parse_reward_specs

# GRPOConfig.loss_type values in trl 1.16 (see its docstring): how token losses are aggregated.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


@dataclass
class GRPOArgs(StageArgs):
    lr: float = _flag(5e-5, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = _flag(32, "completions per device per step (a multiple of --num_generations)")
    epochs: float = _flag(1.0, "passes over the prompts")
    logging_steps: int = _flag(5, "log rewards/KL/lengths every N steps")
    save_steps: int = _flag(100, "save a checkpoint every N steps (and always at the end)")
    eval_steps: int = _flag(100, "measure held-out greedy accuracy every N steps (0 = only before and after)")
    num_generations: int = _flag(8, "group size G: completions sampled per prompt")
    beta: float = _flag(0.04, "KL coefficient towards the starting model (0 = no reference model, faster)")
    loss_type: str = _flag("dapo", "how token losses are aggregated (trl's GRPOConfig.loss_type)", choices=LOSS_TYPES)
    epsilon: float = _flag(0.2, "PPO clip range for the importance ratio")
    max_completion_length: int = _flag(64, "maximum tokens per sampled completion")
    temperature: float = _flag(0.7, "sampling temperature for the group (lower = fewer garbled answers, less variety)",
                                positive=True)
    reward: str = _flag("correctness,format", "reward functions: comma list (or repeat the flag) of "
                                              "correctness, format, or package.module:function")
    reward_weights: str | None = _flag(None, "comma list of weights, one per reward (default: all 1)")
    max_eval_prompts: int = _flag(200, "held-out prompts for greedy accuracy")


def merge_repeated_flag(argv: Sequence[str] | None, flag: str) -> list[str]:
    """`--reward a --reward b,c` -> `--reward a,b,c` (argparse would keep only the last)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(flag + "="):
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, ",".join(values)] if values else [])


def rl_rows(path: Path, skip_bad_lines: bool) -> list[dict]:
    """RL records as trl's conversational prompt format plus the `gt` column the rewards read."""
    return [{"prompt": r["prompt"], "gt": r["gt"]} for r in load_records(path, "rl", skip_bad_lines=skip_bad_lines)]


def build_rewards(args: GRPOArgs) -> tuple[list, list[float] | None]:
    specs = parse_reward_specs(args.reward)
    if not specs:
        raise StageError("--reward: give at least one reward (correctness, format or package.module:function)")
    try:
        funcs = [load_reward(s) for s in specs]
    except ValueError as e:
        raise StageError(str(e)) from e
    weights = None
    if args.reward_weights:
        try:
            weights = [float(w) for w in str(args.reward_weights).split(",") if w.strip()]
        except ValueError as e:
            raise StageError(f"--reward_weights {args.reward_weights!r}: not a comma list of numbers") from e
        if len(weights) != len(funcs):
            raise StageError(f"--reward_weights has {len(weights)} values for {len(funcs)} rewards ({', '.join(specs)})")
    return funcs, weights


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> GRPOTrainer:
    args = parse_args(GRPOArgs, merge_repeated_flag(argv, "--reward"), __doc__)
    run = start_stage("grpo", args)
    init = resolve_init("grpo", args)
    data = resolve_data(args, "rl")
    reward_funcs, reward_weights = build_rewards(args)

    train_rows = rl_rows(data.train, args.skip_bad_lines)
    if data.eval is not None:
        eval_rows = rl_rows(data.eval, args.skip_bad_lines)
    else:  # hold out the tail of --data
        n_eval = min(args.max_eval_prompts, max(1, len(train_rows) // 10))
        train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
    eval_rows = [r for r in eval_rows if r["gt"]][: args.max_eval_prompts]
    graded = sum(bool(r["gt"]) for r in train_rows)
    if not train_rows:
        raise StageError(f"{data.train}: no RL prompts to train on")
    if any(getattr(f, "__name__", "") == "correctness" for f in reward_funcs) and graded == 0:
        raise StageError(f"{data.train} has no 'gt' answers, so the correctness reward is always 0; "
                         f"use --reward format or a custom --reward package.module:function")
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
        measure=lambda m: greedy_accuracy(m, tokenizer, prompts, golds, args.max_completion_length) if prompts else None)
    attach_callbacks(trainer, heldout, perplexity=False)
    trainer.train(resume_from_checkpoint=resume_checkpoint(run, args))

    if len(heldout.history) >= 2:
        (s0, before), (s1, after) = heldout.history[0], heldout.history[-1]
        logger.info(f"held-out greedy accuracy: {before:.3f} at step {s0} -> {after:.3f} at step {s1} "
                    f"({len(eval_rows)} prompts)")
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_5_reward.py  (reward model for PPO)")
    return trainer


if __name__ == "__main__":
    run_main(main)
