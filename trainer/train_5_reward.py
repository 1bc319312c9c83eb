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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from loguru import logger
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from dataset.jsonl import load_records
from trainer.callbacks import attach_callbacks
from trainer.common import (StageArgs, StageError, _flag, latest_checkpoint, parse_args, resolve_data, resolve_init,
                            resume_checkpoint, run_main, start_stage, trainer_kwargs)
from trainer.ppo import HeldOutMetricCallback, reward_model_accuracy


@dataclass
class RewardArgs(StageArgs):
    lr: float = _flag(2e-4, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = _flag(16, "preference pairs per device per micro-batch")
    epochs: float = _flag(1.0, "passes over the preference pairs")
    eval_steps: int = _flag(50, "evaluate held-out loss/accuracy every N steps")
    save_steps: int = _flag(200, "save a checkpoint every N steps (and always at the end)")
    center_rewards: float = _flag(0.01, "coefficient of mean((r_chosen + r_rejected)^2), keeping scores near 0")
    max_eval_pairs: int = _flag(300, "held-out pairs for the pairwise accuracy")


def load_reward_model(init: Path, pad_token_id: int, dtype):
    """A `num_labels=1` MiniMindForSequenceClassification from a CausalLM checkpoint: the backbone
    (`model.*`) loads, `score` is new, `lm_head` is dropped. Anything else missing is an error."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        init, num_labels=1, pad_token_id=pad_token_id, dtype=dtype, output_loading_info=True)
    missing = set(info["missing_keys"])
    if not missing <= {"score.weight"}:
        raise StageError(f"{init}: loading a reward model left backbone weights uninitialised: {sorted(missing)}")
    loaded = len(model.state_dict()) - len(missing)
    logger.info(f"reward model from {init}: {loaded} backbone tensors loaded, "
                f"{'new score head' if missing else 'score head loaded'}"
                f"{', dropped ' + ', '.join(sorted(info['unexpected_keys'])) if info['unexpected_keys'] else ''}")
    return model


def pair_rows(path: Path, skip_bad_lines: bool) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in load_records(path, "dpo", skip_bad_lines=skip_bad_lines)]


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> RewardTrainer:
    args = parse_args(RewardArgs, argv, __doc__)
    run = start_stage("reward", args)
    init = resolve_init("reward", args)
    data = resolve_data(args, "dpo")

    train_rows = pair_rows(data.train, args.skip_bad_lines)
    if data.eval is not None:
        eval_rows = pair_rows(data.eval, args.skip_bad_lines)
    else:  # hold out the tail of --data
        n_eval = min(args.max_eval_pairs, max(1, len(train_rows) // 10))
        train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
    eval_rows = eval_rows[: args.max_eval_pairs]
    if not train_rows:
        raise StageError(f"{data.train}: no preference pairs to train on")
    logger.info(f"{len(train_rows)} preference pairs, {len(eval_rows)} held out")

    tokenizer = AutoTokenizer.from_pretrained(init)
    model = load_reward_model(init, tokenizer.pad_token_id, run.precision.dtype)
    config = RewardConfig(
        **trainer_kwargs(args, run, has_eval=bool(eval_rows), include_num_input_tokens_seen=False),
        max_length=args.max_length,
        center_rewards_coefficient=args.center_rewards or None,
    )
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
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
    trainer.train(resume_from_checkpoint=resume_checkpoint(run, args))

    if len(heldout.history) >= 2:
        logger.info(f"held-out pairwise accuracy: {heldout.history[0][1]:.3f} -> {heldout.history[-1][1]:.3f} "
                    f"({len(eval_rows)} pairs)")
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_6_ppo.py  (PPO with this reward model)")
    return trainer


if __name__ == "__main__":
    run_main(main)
