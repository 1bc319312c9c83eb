"""Stage 2: supervised fine-tuning (SFT), teaching the pretrained model to answer in the chat format.

Each conversation is rendered with the chat template and trained with next-token cross-entropy on
the *assistant* tokens only (trl's `assistant_only_loss`, driven by the template's
{% generation %} marks): the system/user turns and the `<|im_start|>assistant\\n` headers are context
(label -100); every assistant reply and its closing `<|im_end|>` are learned, so the model learns to
answer *and* to stop. Multi-turn conversations train every assistant turn at once.

Truncation policy: a conversation longer than --max_length tokens keeps its first --max_length tokens
(trl's "keep_start"); a conversation whose kept part holds no assistant token is dropped. Both counts
are logged. With --packing, conversations are packed into rows of --max_length (best-fit, no padding);
the model receives position_ids that restart at 0 for each conversation and builds a block-diagonal
mask from them, so packed conversations never see each other.

--lora trains low-rank adapters (W + B A * alpha / r) on the --lora_targets projections instead of all
weights; --qlora does the same on a 4-bit (NF4) copy of the base model (bitsandbytes). Either way the
stage saves the adapter in <out_dir>/sft/adapter/ AND a merged full model as checkpoint-<step>, which
later stages load like any checkpoint (trainer/lib/lora.py). The held-out answer accuracy (greedy) is
measured before (the pretrained model) and after.

    python trainer/train_2_sft.py                      # full fine-tune of the pretrained demo model
    python trainer/train_2_sft.py --lora --lr 2e-3     # adapters only
    python trainer/train_2_sft.py --data dataset/sft_t2t_mini.jsonl --max_length 512 --packing
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trainer.lib.quiet  # noqa: F401, I001  (first: silences a bitsandbytes warning trl's import triggers)

from datasets import Dataset
from loguru import logger
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from trainer.lib.callbacks import SampleCallback, attach_callbacks
from trainer.lib.data import chat_dataset, resolve_data, train_and_eval
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, parse_args)
from trainer.lib.generation import REPLY_TOKENS, chat_ids
from trainer.lib.lora import LoraFlags, build_model, save_merged
from trainer.lib.metrics import chat_answer_items, logged_answer_accuracy
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.runtime import StageRun, run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, resume_checkpoint


@dataclass
class SFTArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags, LoraFlags):
    lr: float = flag(1e-3, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = flag(16, "conversations per device per micro-batch")
    # On the demo the tiny model learns the answer *format* within one epoch but learns to copy
    # names and numbers from the question only during the second: held-out loss 0.55 -> 0.19.
    epochs: float = flag(3.0, "passes over the training conversations")
    max_length: int = flag(256, "tokens per conversation (longer ones keep their start)")
    eval_steps: int = flag(100, "evaluate held-out loss every N steps")
    save_steps: int = flag(500, "save a checkpoint every N steps (and always at the end)")
    packing: bool = flag(False, "pack conversations into rows of --max_length (padding-free, position_ids)")
    max_eval_conversations: int = flag(200, "held-out conversations for the eval loss")
    eval_answers: int = flag(100, "held-out conversations answered greedily before and after (0 = skip)")
    max_new_tokens: int = flag(REPLY_TOKENS, "reply length for the accuracy check and the samples")
    sample_prompts: str = flag("What is 23 + 45?|Tom has a red ball. What colour is Tom's ball?",
                               "user messages ('|'-separated) answered at every evaluation")


def count_truncated(tokenizer, conversations: Dataset, max_length: int) -> tuple[int, int]:
    """(conversations longer than max_length, longest length in tokens)."""
    lengths = [len(chat_ids(tokenizer, m)) for m in conversations["messages"]]
    return sum(n > max_length for n in lengths), max(lengths, default=0)


def build_trainer(args: SFTArgs, run: StageRun, lm, tokenizer, train_set: Dataset, eval_set: Dataset,
                  callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    """trl's SFTTrainer with the course's settings: assistant-only loss, keep-start truncation, optional packing."""
    config = SFTConfig(**trainer_kwargs(args, run, has_eval=True),
                       max_length=args.max_length, truncation_mode="keep_start", assistant_only_loss=True,
                       packing=args.packing, packing_strategy="bfd")
    return SFTTrainer(model=lm, args=config, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, callbacks=list(callbacks))


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    args = parse_args(SFTArgs, argv, __doc__)
    run = start_stage("sft", args)
    init = resolve_init("sft", args.out_dir, args.init_from)
    data = resolve_data(args, "sft")
    if args.resume and (args.lora or args.qlora):
        raise StageError("--resume with --lora/--qlora is not supported: the saved checkpoint is the merged model; "
                         "start a new run with --init_from sft instead")
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.chat_template is None:
        raise StageError(f"{init}: the tokenizer has no chat template; train it with python trainer/train_0_tokenizer.py")

    # On disk, memory-mapped: MiniMind's SFT files are GBs (see trainer/lib/data.py: disk_dataset).
    train_set, eval_set = train_and_eval(data, lambda p: chat_dataset(p, run.dir / "cache", args.skip_bad_lines),
                                         args.max_eval_conversations)
    truncated, longest = count_truncated(tokenizer, train_set, args.max_length)
    logger.info(f"{len(train_set):,} training conversations ({truncated} longer than --max_length={args.max_length}: "
                f"their first {args.max_length} tokens are kept; longest {longest}); "
                f"{len(eval_set)} held-out conversations")

    trainer = build_trainer(args, run, build_model(args, init, run), tokenizer, train_set, eval_set, callbacks)
    if len(trainer.train_dataset) == 0:
        raise StageError(f"{data.train}: no assistant token in the first --max_length {args.max_length} tokens of any "
                         f"conversation, so there is nothing to learn; raise --max_length (longest: {longest} tokens)")
    if not args.packing:
        dropped = len(train_set) - len(trainer.train_dataset)
        if dropped:
            logger.warning(f"{dropped} conversations dropped: no assistant token left after truncation")
    attach_callbacks(trainer, SampleCallback(trainer, tokenizer, args.sample_prompts.split("|"), chat=True,
                                             max_new_tokens=args.max_new_tokens))
    report = StageReport(run, resume=args.resume)
    prompts, golds = chat_answer_items([r["messages"] for r in eval_set])
    prompts, golds = prompts[: args.eval_answers], golds[: args.eval_answers]
    if prompts:
        def accuracy(lm) -> float:
            return logged_answer_accuracy(lm.to(trainer.args.device), tokenizer, prompts, golds, args.max_new_tokens)

        report.before("answer_accuracy", lambda: accuracy(trainer.model), higher_is_better=True, n=len(prompts))
    trainer.train(resume_from_checkpoint=resume_checkpoint(run.dir, args.resume))

    final = run.dir / f"checkpoint-{trainer.state.global_step}"
    if args.lora or args.qlora:
        trained = save_merged(trainer.model, init, final, run.dir / "adapter", tokenizer)
        logger.info(f"adapter saved to {run.dir / 'adapter'}; merged model saved to {final}")
    else:
        trained = trainer.model
    if prompts:
        report.after("answer_accuracy", accuracy(trained))
        trainer.log({"eval_answer_accuracy": report.metrics["answer_accuracy"]["after"]})  # -> TensorBoard too
    report.save(trainer.state.global_step, **trainer_seen(trainer))
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_3_dpo.py  (or chat: python scripts/test_chat.py --stage sft)")
    return trainer


if __name__ == "__main__":
    run_main(main)
