"""Stage 5: a reward model, learned from human (here: generated) preferences.

The reward model is the SFT model with its vocabulary head swapped for a scalar `score` head:
r(prompt, answer) is read at the last token of the whole conversation. It is trained on pairs
with the Bradley-Terry loss (Ouyang et al. 2022),

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected)),

which only asks the chosen answer to score higher; the scale is free, so a small penalty
(--center_rewards) keeps scores near 0, which PPO likes. The measure is held-out pairwise
accuracy: the share of unseen pairs ranked the right way round (50% = chance). PPO (stage 6)
then uses this model as its reward and as the starting point of its critic.

    python trainer/train_5_reward.py                             # from the latest sft checkpoint, demo pairs
    python trainer/train_5_reward.py --data ../shared/data/dpo_hh_harmless.jsonl --max_length 512
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import trainer.lib.quiet  # noqa: F401, I001  (first: silences a bitsandbytes warning trl's import triggers)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from loguru import logger
from transformers import AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from trainer.lib.callbacks import HeldOutMetricCallback, attach_callbacks
from trainer.lib.data import pair_dataset, resolve_data, train_and_eval
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, parse_args)
from trainer.lib.generation import chat_ids
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.reward_model import load_reward_model, reward_model_accuracy
from trainer.lib.runtime import run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, resume_checkpoint


@dataclass
class RewardArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags):
    lr: float = flag(2e-4, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = flag(16, "preference pairs per device per micro-batch")
    # One pass learns the coarse cues (an answer cut short, no answer line: 100%) but not whether the
    # operators match the question (65%); that comes in the second pass (100% by the third).
    epochs: float = flag(3.0, "passes over the preference pairs")
    max_length: int = flag(256, "maximum tokens per prompt + answer (trl's RewardConfig.max_length)")
    eval_steps: int = flag(50, "evaluate held-out loss/accuracy every N steps")
    save_steps: int = flag(200, "save a checkpoint every N steps (and always at the end)")
    center_rewards: float = flag(0.01, "coefficient of mean((r_chosen + r_rejected)^2), keeping scores near 0")
    max_eval_pairs: int = flag(300, "held-out pairs for the pairwise accuracy")


def fitting_pairs(tokenizer, rows: Dataset | list[dict], max_length: int, name: str) -> Dataset | list[dict]:
    """The pairs whose chosen and rejected conversations both fit in max_length tokens. trl's
    RewardTrainer drops longer pairs without a word; dropping them here, loudly, keeps our held-out
    accuracy on exactly the pairs trl trains and evaluates on. A Dataset (on disk) streams through
    and keeps only the indices, so memory stays bounded."""
    def fits(row: dict) -> bool:
        return all(len(chat_ids(tokenizer, row["prompt"] + row[side])) <= max_length for side in ("chosen", "rejected"))
    keep = [i for i, r in enumerate(rows) if fits(r)]
    kept = rows.select(keep) if isinstance(rows, Dataset) else [rows[i] for i in keep]
    if len(kept) < len(rows):
        logger.warning(f"{len(rows) - len(kept)} of {len(rows)} {name} pairs are longer than --max_length="
                       f"{max_length} tokens and are left out; raise --max_length to keep them")
    return kept


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> RewardTrainer:
    args = parse_args(RewardArgs, argv, __doc__)
    run = start_stage("reward", args)
    init = resolve_init("reward", args.out_dir, args.init_from)
    data = resolve_data(args, "reward")

    # On disk, memory-mapped (trainer/lib/data.py: disk_dataset), as DPO's pairs; the few held-out ones as a list.
    train_rows, eval_rows = train_and_eval(data, lambda p: pair_dataset(p, run.dir / "cache", args.skip_bad_lines),
                                           args.max_eval_pairs)
    eval_rows = list(eval_rows)
    if not train_rows:
        raise StageError(f"{data.train}: no preference pairs to train on")
    logger.info(f"{len(train_rows)} preference pairs, {len(eval_rows)} held out")

    tokenizer = AutoTokenizer.from_pretrained(init)
    train_rows, eval_rows = (fitting_pairs(tokenizer, rows, args.max_length, name)
                             for rows, name in ((train_rows, "training"), (eval_rows, "held-out")))
    if not train_rows:
        raise StageError(f"{data.train}: every preference pair is longer than --max_length={args.max_length} "
                         "tokens; raise --max_length")
    model = load_reward_model(init, run.precision.dtype, tokenizer.pad_token_id)
    config = RewardConfig(
        **trainer_kwargs(args, run, has_eval=bool(eval_rows), include_num_input_tokens_seen=False),
        max_length=args.max_length,
        center_rewards_coefficient=args.center_rewards or None,
    )
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=train_rows,
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    # At the start (a random score head: about chance) and at the end; trl's eval/accuracy is the
    # same measure on the same pairs at every evaluation.
    heldout = HeldOutMetricCallback(
        trainer, "eval/pairwise_accuracy", every=0,
        measure=lambda m: reward_model_accuracy(m, tokenizer, eval_rows, args.batch_size) if eval_rows else None)
    attach_callbacks(trainer, heldout, perplexity=False)
    trainer.train(resume_from_checkpoint=resume_checkpoint(run.dir, args.resume))

    if len(heldout.history) >= 2:
        report = StageReport(run, resume=args.resume)
        report.before("pairwise_accuracy", heldout.history[0][1], higher_is_better=True, n=len(eval_rows))
        report.after("pairwise_accuracy", heldout.history[-1][1])
        report.save(trainer.state.global_step, **trainer_seen(trainer))
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_6_ppo.py  (PPO with this reward model)")
    return trainer


if __name__ == "__main__":
    run_main(main)
