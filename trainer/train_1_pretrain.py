"""Stage 1: pretraining, next-token prediction on plain text.

Every document is tokenized and followed by <|im_end|>; the documents are joined into one stream
and cut into blocks of --max_length tokens (no padding, no waste). The model learns
p(token_t | tokens_<t) with cross-entropy; held-out loss is compared with the unigram baseline
(a model that only knows how frequent each token is) so the number means something.

    python trainer/train_1_pretrain.py                       # tiny model on the demo corpus
    python trainer/train_1_pretrain.py --preset small --data dataset/pretrain_t2t_mini.jsonl
    torchrun --nproc_per_node 2 trainer/train_1_pretrain.py  # several processes, same script
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator

import model as mm
from dataset.pretokenize import PackedBlocks, TokenMemmap, pretokenize
from trainer.lib.callbacks import SampleCallback, attach_callbacks
from trainer.lib.data import hold_out, resolve_data
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, parse_args)
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.runtime import run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, resume_checkpoint


@dataclass
class PretrainArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags):
    preset: str = flag("tiny", "model size preset (tiny, small, base, moe, tiny-moe; see model/config.py)")
    lr: float = flag(2e-3, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = flag(16, "blocks per device per micro-batch")
    max_length: int = flag(256, "block length in tokens")
    epochs: float = flag(2.0, "passes over the training tokens")
    eval_steps: int = flag(100, "evaluate on held-out blocks every N steps")
    save_steps: int = flag(200, "save a checkpoint every N steps (and always at the end)")
    max_eval_blocks: int = flag(200, "evaluate on at most this many held-out blocks")
    sample_prompts: str = flag("Tom has a|Mia went to the|23 + 45:",
                               "prompts ('|'-separated) continued at every evaluation")


def token_stream(path: Path, tokenizer, cache_dir: Path) -> TokenMemmap:
    """Tokenize a jsonl once into a memory-mapped file, reused while the file is unchanged."""
    stat = path.stat()
    prefix = cache_dir / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-v{len(tokenizer)}"
    if not Path(f"{prefix}.meta.json").is_file():
        pretokenize(path, tokenizer, prefix)
    return TokenMemmap(prefix)


def unigram_loss(tokens: np.ndarray) -> float:
    """Cross-entropy (nats/token) of predicting each token from its frequency alone."""
    counts = np.array(list(Counter(tokens.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    args = parse_args(PretrainArgs, argv, __doc__)
    run = start_stage("pretrain", args)
    tokenizer = AutoTokenizer.from_pretrained(resolve_init("pretrain", args.out_dir, args.init_from))
    data = resolve_data(args, "pretrain")

    train_tokens = token_stream(data.train, tokenizer, run.dir / "tokens")
    train_set = PackedBlocks(train_tokens, args.max_length)
    if data.eval is not None:
        eval_set = PackedBlocks(token_stream(data.eval, tokenizer, run.dir / "tokens"), args.max_length)
    else:  # the tail blocks of the stream are held out
        train_set, eval_set = hold_out(train_set, args.max_eval_blocks)
    eval_set = torch.utils.data.Subset(eval_set, range(min(len(eval_set), args.max_eval_blocks)))
    if len(train_set) == 0:
        raise StageError(f"{data.train} holds fewer than --max_length={args.max_length} tokens: nothing to train on")
    eval_tokens = np.concatenate([eval_set[i]["input_ids"].numpy() for i in range(len(eval_set))])
    baseline = unigram_loss(eval_tokens)
    logger.info(f"{len(train_tokens):,} training tokens -> {len(train_set):,} blocks of {args.max_length}; "
                f"{len(eval_set)} held-out blocks; unigram baseline loss {baseline:.3f}")

    config = mm.config_from_preset(
        args.preset, vocab_size=len(tokenizer), max_position_embeddings=max(args.max_length, 2048),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = mm.MiniMindForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info(f"model {args.preset}: {mm.format_parameters(model)}")

    report = StageReport(run, resume=args.resume)
    resume = resume_checkpoint(run.dir, args.resume)
    # The untrained model's held-out loss (about ln(vocab) nats) is the Trainer's own evaluation at
    # step 0 (eval_on_start; a resumed run finds it in the checkpoint's log history), not a
    # trainer.evaluate() before trainer.train(): that call registers the model with accelerate
    # unwrapped, and train() then leaves it outside DistributedDataParallel, so under torchrun every
    # process trained its own copy (measured: the two processes' parameters apart after one step).
    trainer = Trainer(
        model=model,
        # Only MoE leaves parameters unused in a step (experts no token chose); searching for them
        # costs DDP an extra pass, so dense models skip it.
        args=TrainingArguments(**trainer_kwargs(args, run, has_eval=True, ddp_find_unused_parameters=config.is_moe,
                                                eval_on_start=resume is None)),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    attach_callbacks(trainer, SampleCallback(trainer, tokenizer, args.sample_prompts.split("|"), chat=False))
    trainer.train(resume_from_checkpoint=resume)

    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    at_start = [h["eval_loss"] for h in evals if h["step"] == 0] or [float("nan")]  # nan: a pre-eval_on_start run
    report.before("eval_loss", at_start[0], higher_is_better=False, baseline=baseline)
    metrics = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    report.after("eval_loss", metrics["eval_loss"])
    report.save(trainer.state.global_step, **trainer_seen(trainer))
    logger.info(f"held-out loss {metrics['eval_loss']:.3f} (perplexity {math.exp(metrics['eval_loss']):.2f}) "
                f"vs unigram baseline {baseline:.3f}; saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_2_sft.py  (or chat: python scripts/test_chat.py --stage pretrain)")
    return trainer


if __name__ == "__main__":
    run_main(main)
