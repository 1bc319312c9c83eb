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
later stages load like any checkpoint. At the end the held-out answer accuracy (greedy) is logged.

    python trainer/train_2_sft.py                      # full fine-tune of the pretrained demo model
    python trainer/train_2_sft.py --lora --lr 2e-3     # adapters only
    python trainer/train_2_sft.py --data dataset/sft_t2t_mini.jsonl --max_length 512 --packing
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
from trl import SFTConfig, SFTTrainer

import model as mm  # noqa: F401  (registers MiniMind with the Auto classes)
from dataset.jsonl import LoadReport, load_records
from trainer.callbacks import SampleCallback, attach_callbacks
from trainer.common import (StageArgs, StageError, StageRun, _flag, latest_checkpoint, parse_args, resolve_data,
                            resolve_init, resume_checkpoint, run_main, start_stage, trainer_kwargs)
from trainer.evaluation import answer_accuracy, answer_items, chat_ids

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class SFTArgs(StageArgs):
    lr: float = _flag(1e-3, "peak learning rate (cosine schedule with warmup)")
    batch_size: int = _flag(16, "conversations per device per micro-batch")
    # On the demo the tiny model learns the answer *format* within one epoch but learns to copy
    # names and numbers from the question only during the second: held-out loss 0.55 -> 0.19.
    epochs: float = _flag(3.0, "passes over the training conversations")
    max_length: int = _flag(256, "tokens per conversation (longer ones keep their start)")
    eval_steps: int = _flag(100, "evaluate held-out loss every N steps")
    save_steps: int = _flag(500, "save a checkpoint every N steps (and always at the end)")
    packing: bool = _flag(False, "pack conversations into rows of --max_length (padding-free, position_ids)")
    max_eval_conversations: int = _flag(200, "held-out conversations for the eval loss")
    eval_answers: int = _flag(100, "held-out conversations answered greedily at the end (0 = skip)")
    max_new_tokens: int = _flag(48, "reply length for the final accuracy check and the samples")
    lora: bool = _flag(False, "train LoRA adapters instead of all weights (merged into the saved checkpoint)")
    qlora: bool = _flag(False, "LoRA on a 4-bit (NF4, bitsandbytes) base model (GPU, or CPU: slower)")
    lora_r: int = _flag(16, "LoRA rank r")
    lora_alpha: int = _flag(32, "LoRA scale: the update is B A * alpha / r")
    lora_dropout: float = _flag(0.05, "dropout on the LoRA input")
    lora_targets: str = _flag(LORA_TARGETS, "comma-separated module names that get adapters")
    sample_prompts: str = _flag("What is 23 + 45?|Tom has a red ball. What colour is Tom's ball?",
                                "user messages ('|'-separated) answered at every evaluation")


def load_conversations(path: Path, skip_bad_lines: bool, limit: int | None = None) -> Dataset:
    """A chat jsonl -> datasets.Dataset of {"messages"} (trl's conversational language-modeling format)."""
    report = LoadReport()
    records = load_records(path, "chat", skip_bad_lines=skip_bad_lines, limit=limit, report=report)
    return Dataset.from_list([{"messages": r["messages"]} for r in records])


def count_truncated(tokenizer, conversations: Dataset, max_length: int) -> tuple[int, int]:
    """(conversations longer than max_length, longest length in tokens)."""
    lengths = [len(chat_ids(tokenizer, m)) for m in conversations["messages"]]
    return sum(n > max_length for n in lengths), max(lengths, default=0)


def disable_cpu_bf16_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on the autograd path on CPUs with AVX512-BF16.

    After any no-grad forward (evaluation, generate) bitsandbytes repacks 4-bit weights for a fast
    CPU kernel that has no backward: every later LoRA gradient is silently None. Returns how many
    layers were switched."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def build_model(args: SFTArgs, init: Path, run: StageRun):
    """The model to train: the checkpoint itself, or it wrapped with LoRA adapters (on a 4-bit base for --qlora)."""
    if not (args.lora or args.qlora):
        return AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)

    from peft import LoraConfig, get_peft_model

    if args.qlora:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=run.precision.dtype)
        base = AutoModelForCausalLM.from_pretrained(init, quantization_config=quant, dtype=run.precision.dtype)
        disable_cpu_bf16_repacking(base)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as e:
        raise StageError(f"--lora_targets {args.lora_targets}: {e}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {','.join(targets)}: "
                f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.1f}%)")
    return peft_model


def build_trainer(args: SFTArgs, run: StageRun, lm, tokenizer, train_set: Dataset, eval_set: Dataset,
                  callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    """trl's SFTTrainer with the course's settings: assistant-only loss, keep-start truncation, optional packing."""
    config = SFTConfig(**trainer_kwargs(args, run, has_eval=True),
                       max_length=args.max_length, truncation_mode="keep_start", assistant_only_loss=True,
                       packing=args.packing, packing_strategy="bfd")
    return SFTTrainer(model=lm, args=config, train_dataset=train_set, eval_dataset=eval_set,
                      processing_class=tokenizer, callbacks=list(callbacks))


def save_merged(peft_model, init: Path, ckpt: Path, adapter_dir: Path, tokenizer) -> torch.nn.Module:
    """Adapter -> <stage>/adapter/; base (full precision, from `init`) + adapter merged -> `ckpt`.

    The trainer's final checkpoint holds only adapter files; they move to adapter/ so that
    `checkpoint-<step>` is an ordinary model dir (a stray adapter_config.json would make
    from_pretrained treat it as an adapter)."""
    from peft import PeftModel

    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (ckpt / name).unlink(missing_ok=True)
    base = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    return merged


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    args = parse_args(SFTArgs, argv, __doc__)
    run = start_stage("sft", args)
    init = resolve_init("sft", args)
    data = resolve_data(args, "sft")
    if args.resume and (args.lora or args.qlora):
        raise StageError("--resume with --lora/--qlora is not supported: the saved checkpoint is the merged model; "
                         "start a new run with --init_from sft instead")
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.chat_template is None:
        raise StageError(f"{init}: the tokenizer has no chat template; train it with python trainer/train_0_tokenizer.py")

    train_set = load_conversations(data.train, args.skip_bad_lines)
    eval_set = (load_conversations(data.eval, args.skip_bad_lines, limit=args.max_eval_conversations)
                if data.eval is not None else None)
    if eval_set is None:  # hold out the tail of the training file
        n_eval = min(args.max_eval_conversations, max(1, len(train_set) // 20))
        eval_set = train_set.select(range(len(train_set) - n_eval, len(train_set)))
        train_set = train_set.select(range(len(train_set) - n_eval))
    truncated, longest = count_truncated(tokenizer, train_set, args.max_length)
    logger.info(f"{len(train_set):,} training conversations ({truncated} longer than --max_length={args.max_length}: "
                f"their first {args.max_length} tokens are kept; longest {longest}); "
                f"{len(eval_set)} held-out conversations")

    trainer = build_trainer(args, run, build_model(args, init, run), tokenizer, train_set, eval_set, callbacks)
    if not args.packing:
        dropped = len(train_set) - len(trainer.train_dataset)
        if dropped:
            logger.warning(f"{dropped} conversations dropped: no assistant token left after truncation")
    prompts = [p for p in args.sample_prompts.split("|") if p.strip()]
    attach_callbacks(trainer, SampleCallback(trainer, tokenizer, prompts, chat=True, max_new_tokens=args.max_new_tokens))
    trainer.train(resume_from_checkpoint=resume_checkpoint(run, args))

    final = run.dir / f"checkpoint-{trainer.state.global_step}"
    if args.lora or args.qlora:
        trained = save_merged(trainer.model, init, final, run.dir / "adapter", tokenizer)
        logger.info(f"adapter saved to {run.dir / 'adapter'}; merged model saved to {final}")
    else:
        trained = trainer.model
    if args.eval_answers > 0 and data.eval is not None:
        prompts_, golds = answer_items(data.eval, args.eval_answers)
        acc = answer_accuracy(trained.to(trainer.args.device), tokenizer, prompts_, golds, args.max_new_tokens)
        logger.info(f"held-out answer accuracy (greedy, {acc['n']} conversations): {acc['accuracy']:.1%} "
                    f"({acc['answered']:.0%} state an answer)")
        trainer.log({"eval_answer_accuracy": acc["accuracy"]})  # -> log_history and TensorBoard eval/answer_accuracy
    logger.info(f"saved {latest_checkpoint(run.dir)}")
    logger.info("next: python trainer/train_3_dpo.py  (or chat: python scripts/test_chat.py --stage sft)")
    return trainer


if __name__ == "__main__":
    run_main(main)
