"""LoRA and QLoRA for the SFT stage: low-rank adapters W + B A * alpha / r on chosen projections,
optionally over a 4-bit (NF4, bitsandbytes) copy of the base model, and the merge back into an
ordinary full-precision checkpoint that later stages load like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import AutoModelForCausalLM

from trainer.lib.flags import flag
from trainer.lib.runtime import StageRun
from trainer.lib.stages import StageError, rewriting

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class LoraFlags:
    lora: bool = flag(False, "train LoRA adapters instead of all weights (merged into the saved checkpoint)")
    qlora: bool = flag(False, "LoRA on a 4-bit (NF4, bitsandbytes) base model (GPU, or CPU: slower)")
    lora_r: int = flag(16, "LoRA rank r")
    lora_alpha: int = flag(32, "LoRA scale: the update is B A * alpha / r")
    lora_dropout: float = flag(0.05, "dropout on the LoRA input")
    lora_targets: str = flag(LORA_TARGETS, "comma-separated module names that get adapters")


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


def build_model(args: Any, init: Path, run: StageRun):
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


def save_merged(peft_model, init: Path, ckpt: Path, adapter_dir: Path, tokenizer) -> torch.nn.Module:
    """Adapter -> <stage>/adapter/; base (full precision, from `init`) + adapter merged -> `ckpt`.

    The trainer's final checkpoint holds only adapter files; they move to adapter/ so that
    `checkpoint-<step>` is an ordinary model dir (a stray adapter_config.json would make
    from_pretrained treat it as an adapter)."""
    from peft import PeftModel

    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    with rewriting(ckpt):
        for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            (ckpt / name).unlink(missing_ok=True)
        base = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
    return merged
