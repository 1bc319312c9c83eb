"""Stage 3: direct preference optimisation (DPO), learning from pairs (chosen, rejected) without a reward model.

The implicit reward of a reply y to a prompt x is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), where
pi_ref is the frozen starting model (the SFT checkpoint, loaded a second time and passed to trl as
`ref_model`). The loss pushes the reward of chosen above that of rejected:

    sigmoid (DPO):  -log sigmoid(r_c - r_r)
    ipo:            ((r_c - r_r) / beta / |y| - 1 / (2 beta))^2   (trl normalises log-ratios per token)
    hinge:          max(0, 1 - (r_c - r_r))
    robust:         DPO that assumes a share --label_smoothing of the labels is flipped

`--sft_weight w` adds w * NLL(chosen) (the RPO / "DPO + SFT" term; trl: loss_type [.., "sft"] with
loss_weights [1, w]), which keeps the likelihood of the chosen replies from sinking while the margin
grows. TensorBoard shows rewards/chosen, rewards/rejected, rewards/margins (r_c - r_r) and
rewards/accuracies (share of pairs with r_c > r_r), for train and eval.

    python trainer/train_3_dpo.py                                # from the latest SFT checkpoint
    python trainer/train_3_dpo.py --loss_type ipo --beta 0.5
    python trainer/train_3_dpo.py --data dataset/dpo.jsonl --max_length 512
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from dataset.jsonl import load_records
from trainer.callbacks import SampleCallback, attach_callbacks
from trainer.common import (StageArgs, StageError, _flag, latest_checkpoint, parse_args, resolve_data, resolve_init,
                            resume_checkpoint, run_main, start_stage, trainer_kwargs)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DPOArgs(StageArgs):
    lr: float = _flag(2e-5, "peak learning rate (DPO wants a small one: the reference is one step away)")
    batch_size: int = _flag(16, "preference pairs per device per micro-batch")
    epochs: float = _flag(1.0, "passes over the training pairs")
    max_length: int = _flag(256, "tokens per prompt + reply (longer ones keep their start)")
    warmup_ratio: float = _flag(0.1, "share of steps spent warming the learning rate up")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    eval_steps: int = _flag(50, "evaluate held-out rewards every N steps")
    save_steps: int = _flag(500, "save a checkpoint every N steps (and always at the end)")
    beta: float = _flag(0.1, "strength of the pull towards the reference model (higher = stay closer)")
    loss_type: str = _flag("sigmoid", "preference loss", choices=LOSS_TYPES)
    label_smoothing: float = _flag(0.0, "assumed share of flipped labels, in [0, 0.5); used by --loss_type robust")
    sft_weight: float = _flag(0.0, "weight of an extra NLL loss on the chosen replies (RPO); 0 = pure DPO")
    max_eval_pairs: int = _flag(200, "held-out pairs for the eval rewards")
    sample_prompts: str = _flag("What is 23 + 45?|Mia has 12 apples. Tom gives her 7 more. How many apples does Mia have now?",
                                "user messages ('|'-separated) answered at every evaluation")


def load_pairs(path: Path, skip_bad_lines: bool, limit: int | None = None) -> Dataset:
    """A MiniMind dpo jsonl -> {"prompt", "chosen", "rejected"} message lists (trl's conversational preference format)."""
    return Dataset.from_list(load_records(path, "dpo", skip_bad_lines=skip_bad_lines, limit=limit))


def loss_settings(args: DPOArgs) -> dict:
    """DPOConfig fields for --loss_type / --label_smoothing / --sft_weight (trl 1.16 has no rpo_alpha:
    the NLL term is the "sft" loss type, combined through loss_weights)."""
    if not 0.0 <= args.label_smoothing < 0.5:
        raise StageError(f"--label_smoothing {args.label_smoothing}: must lie in [0, 0.5)")
    if args.label_smoothing > 0 and args.loss_type != "robust":
        raise StageError("--label_smoothing only changes --loss_type robust in trl 1.16 "
                         f"(got --loss_type {args.loss_type}); use --loss_type robust --label_smoothing {args.label_smoothing}")
    if args.sft_weight < 0:
        raise StageError(f"--sft_weight {args.sft_weight}: must be >= 0")
    loss_type, weights = [args.loss_type], [1.0]
    if args.sft_weight > 0:
        loss_type, weights = loss_type + ["sft"], weights + [args.sft_weight]
    return dict(loss_type=loss_type, loss_weights=weights, beta=args.beta, label_smoothing=args.label_smoothing)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> DPOTrainer:
    args = parse_args(DPOArgs, argv, __doc__)
    run = start_stage("dpo", args)
    settings = loss_settings(args)
    init = resolve_init("dpo", args)
    data = resolve_data(args, "dpo")
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.chat_template is None:
        raise StageError(f"{init}: the tokenizer has no chat template; train it with python trainer/train_0_tokenizer.py")

    train_set = load_pairs(data.train, args.skip_bad_lines)
    if data.eval is not None:
        eval_set = load_pairs(data.eval, args.skip_bad_lines, limit=args.max_eval_pairs)
    else:
        n_eval = min(args.max_eval_pairs, max(1, len(train_set) // 20))
        eval_set = train_set.select(range(len(train_set) - n_eval, len(train_set)))
        train_set = train_set.select(range(len(train_set) - n_eval))
    logger.info(f"{len(train_set):,} training pairs, {len(eval_set)} held-out pairs; "
                f"loss {'+'.join(settings['loss_type'])} (weights {settings['loss_weights']}), beta {args.beta}")

    policy = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    config = DPOConfig(**trainer_kwargs(args, run, has_eval=True), max_length=args.max_length,
                       truncation_mode="keep_start", **settings)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train_set,
                         eval_dataset=eval_set, processing_class=tokenizer, callbacks=list(callbacks))
    prompts = [p for p in args.sample_prompts.split("|") if p.strip()]
    attach_callbacks(trainer, SampleCallback(trainer, tokenizer, prompts, chat=True), perplexity=False)
    trainer.train(resume_from_checkpoint=resume_checkpoint(run, args))

    evals = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    metrics = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    logger.info(f"held-out: reward accuracy {metrics['eval_rewards/accuracies']:.1%}, "
                f"margin {metrics['eval_rewards/margins']:.3f} (chosen {metrics['eval_rewards/chosen']:.3f}, "
                f"rejected {metrics['eval_rewards/rejected']:.3f}); saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_4_grpo.py  (measure: python scripts/evaluate.py --stage dpo --task pref_acc)")
    return trainer


if __name__ == "__main__":
    run_main(main)
