"""Stage 3: direct preference optimisation (DPO), learning from pairs (chosen, rejected) without a reward model.

The implicit reward of a reply y to a prompt x is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), where
pi_ref is the frozen starting model (the SFT checkpoint, loaded a second time and passed to trl as
`ref_model`). The loss pushes the reward of chosen above that of rejected:

    sigmoid (DPO):  -log sigmoid(r_c - r_r)
    ipo:            ((r_c - r_r) / beta / |y| - 1 / (2 beta))^2   (trl normalises log-ratios per token)
    hinge:          max(0, 1 - (r_c - r_r))
    robust:         DPO that assumes a share --label_smoothing of the labels is flipped

`--sft_weight w` (default 1) adds w * NLL(chosen) (the RPO / "DPO + SFT" term; trl: loss_type
[.., "sft"] with loss_weights [1, w]), which keeps the likelihood of the chosen replies from sinking
while the margin grows. Pure DPO (`--sft_weight 0`) can raise the margin by pushing *both* replies
down; on the demo it then drops digits and loses most of the SFT model's held-out accuracy (RL prompts
11.7% -> 4.0%), where the NLL term keeps it (-> 9.3%) at nearly the same preference accuracy.
TensorBoard shows rewards/chosen, rewards/rejected, rewards/margins (r_c - r_r) and rewards/accuracies
(share of pairs with r_c > r_r), for train and eval. Before and after training the stage measures, on
the held-out pairs, the preference accuracy (implicit reward, ties 1/2: 0.5 before, since the policy is
still the reference) and the log-likelihood accuracy (log pi(chosen) > log pi(rejected)), and the
greedy answer accuracy on --eval_answers of the pairs' prompts (graded against the chosen reply's
answer line): what DPO keeps of what SFT taught.

    python trainer/train_3_dpo.py                                # from the latest SFT checkpoint
    python trainer/train_3_dpo.py --loss_type ipo --beta 0.5
    python trainer/train_3_dpo.py --data dataset/dpo.jsonl --max_length 512
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trainer.lib.quiet  # noqa: F401, I001  (first: silences a bitsandbytes warning trl's import triggers)

import torch
from datasets import Dataset
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from trainer.lib.callbacks import SampleCallback, attach_callbacks
from trainer.lib.data import pair_dataset, resolve_data, train_and_eval
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, parse_args)
from trainer.lib.metrics import chat_answer_items, logged_answer_accuracy, loglik_accuracy, pair_logprobs, preference_accuracy
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.runtime import run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, resume_checkpoint

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DPOArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags):
    lr: float = flag(4e-5, "peak learning rate (DPO wants a small one: the reference is one step away)")
    batch_size: int = flag(16, "preference pairs per device per micro-batch")
    epochs: float = flag(1.0, "passes over the training pairs")
    max_length: int = flag(256, "tokens per prompt + reply (longer ones keep their start)")
    warmup_ratio: float = flag(0.1, "share of steps spent warming the learning rate up")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    eval_steps: int = flag(50, "evaluate held-out rewards every N steps")
    save_steps: int = flag(500, "save a checkpoint every N steps (and always at the end)")
    beta: float = flag(0.1, "strength of the pull towards the reference model (higher = stay closer)")
    loss_type: str = flag("sigmoid", "preference loss", choices=LOSS_TYPES)
    label_smoothing: float = flag(0.0, "assumed share of flipped labels, in [0, 0.5); used by --loss_type robust")
    sft_weight: float = flag(1.0, "weight of an extra NLL loss on the chosen replies (RPO); 0 = pure DPO")
    max_eval_pairs: int = flag(200, "held-out pairs for the eval rewards")
    eval_answers: int = flag(100, "held-out pair prompts answered greedily before and after, graded against the "
                                  "chosen reply's answer line: what DPO keeps of SFT's accuracy (0 = skip)")
    sample_prompts: str = flag("What is 23 + 45?|Mia has 12 apples. Tom gives her 7 more. How many apples does Mia have now?",
                               "user messages ('|'-separated) answered at every evaluation")


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
    init = resolve_init("dpo", args.out_dir, args.init_from)
    data = resolve_data(args, "dpo")
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.chat_template is None:
        raise StageError(f"{init}: the tokenizer has no chat template; train it with python trainer/train_0_tokenizer.py")

    # Training pairs on disk, memory-mapped (trainer/lib/data.py: disk_dataset); the few held-out ones as a list.
    train_rows, eval_rows = train_and_eval(data, lambda p: pair_dataset(p, run.dir / "cache", args.skip_bad_lines),
                                           args.max_eval_pairs)
    eval_rows = list(eval_rows)
    logger.info(f"{len(train_rows):,} training pairs, {len(eval_rows)} held-out pairs; "
                f"loss {'+'.join(settings['loss_type'])} (weights {settings['loss_weights']}), beta {args.beta}")

    policy = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    config = DPOConfig(**trainer_kwargs(args, run, has_eval=True), max_length=args.max_length,
                       truncation_mode="keep_start", **settings)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train_rows,
                         eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer, callbacks=list(callbacks))
    attach_callbacks(trainer, SampleCallback(trainer, tokenizer, args.sample_prompts.split("|"), chat=True),
                     perplexity=False)

    ref_logps = pair_logprobs(reference, tokenizer, eval_rows, args.batch_size)

    def scores(logps) -> dict[str, float]:
        return {"pref_acc": preference_accuracy(*logps, *ref_logps, beta=args.beta)["accuracy"],
                "loglik_acc": loglik_accuracy(*logps)["accuracy"]}

    report = StageReport(run, resume=args.resume)
    report.before_each(lambda: scores(ref_logps), higher_is_better=True, n=len(eval_rows))  # the policy starts as the reference
    prompts, golds = chat_answer_items([r["prompt"] + r["chosen"] for r in eval_rows[: args.eval_answers]])
    if prompts:
        report.before("answer_accuracy", lambda: logged_answer_accuracy(reference, tokenizer, prompts, golds),
                      higher_is_better=True, n=len(prompts))
    trainer.train(resume_from_checkpoint=resume_checkpoint(run.dir, args.resume))

    for name, value in scores(pair_logprobs(trainer.model, tokenizer, eval_rows, args.batch_size)).items():
        report.after(name, value)
    if prompts:
        report.after("answer_accuracy", logged_answer_accuracy(trainer.model, tokenizer, prompts, golds))
    report.save(trainer.state.global_step, **trainer_seen(trainer))
    evals = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    metrics = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    logger.info(f"held-out (trl, ties count as wrong): reward accuracy {metrics['eval_rewards/accuracies']:.1%}, "
                f"margin {metrics['eval_rewards/margins']:.3f} (chosen {metrics['eval_rewards/chosen']:.3f}, "
                f"rejected {metrics['eval_rewards/rejected']:.3f}); saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_4_grpo.py  (measure: python scripts/evaluate.py --stage dpo --task pref_acc)")
    return trainer


if __name__ == "__main__":
    run_main(main)
