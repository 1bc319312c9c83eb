"""How a stage runs: logging, seeding, device and precision, several processes, the entry point,
and the keyword arguments every `transformers.Trainer` gets.

    run = start_stage("sft", args)      # <out_dir>/sft/, train.log, seed, precision, TensorBoard dir
    ...
    if __name__ == "__main__":
        run_main(main)                  # a StageError / DataError is one line and exit code 2
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from loguru import logger

from trainer.lib.stages import StageError


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(log_file: Path | None = None) -> None:
    """loguru to stderr (and a file) on the main process; other ranks only report errors."""
    logger.remove()
    if not is_main_process():
        logger.add(sys.stderr, level="ERROR")
        return
    logger.add(sys.stderr, level="INFO", format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level="DEBUG")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.dtype == torch.float16


def pick_precision(device: str = "auto", dtype: str = "auto") -> Precision:
    """bf16 mixed precision on a GPU that has it, fp32 on CPU (bf16 autocast on CPU is possible
    but the Trainer's CPU path and trl's defaults make fp32 the safe, exact choice)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda was asked for but no CUDA GPU is visible")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise StageError("--dtype fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return Precision(device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


@dataclass(frozen=True)
class StageRun:
    """Where one stage writes, and how it computes."""

    stage: str
    out_dir: Path
    dir: Path
    precision: Precision


def start_stage(stage: str, args: Any) -> StageRun:
    """Create the stage dir, set up logging, seed (stages with a --seed), choose precision
    (stages with --device/--dtype; the rest run on the CPU); log what was chosen."""
    # trl 1.16 still calls transformers' deprecated `is_gradient_checkpointing` at every train start:
    # a FutureWarning (with its traceback line) the learner can do nothing about.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    out_dir = Path(args.out_dir)
    sdir = out_dir / stage
    sdir.mkdir(parents=True, exist_ok=True)
    setup_logging(sdir / "train.log")
    if hasattr(args, "seed"):
        seed_everything(args.seed)
    precision = pick_precision(getattr(args, "device", "cpu"), getattr(args, "dtype", "fp32"))
    # transformers 5.x dropped `logging_dir`: TensorBoard events go where this variable says.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(sdir / "runs")
    logger.info(f"stage {stage}: writing to {sdir} on {precision.device} ({str(precision.dtype).removeprefix('torch.')})")
    return StageRun(stage, out_dir, sdir, precision)


def trainer_kwargs(args: Any, run: StageRun, has_eval: bool, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `transformers.TrainingArguments` and every trl `*Config` (they subclass it),
    from a stage's ScheduleFlags, CheckpointFlags and TrainerFlags.

    Sets explicitly what the library defaults get wrong for this course: trl defaults to bf16 and
    gradient checkpointing (errors / very slow on CPU); checkpoints go to <out_dir>/<stage>/."""
    kwargs = dict(
        output_dir=str(run.dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5.x
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        report_to=["tensorboard"],
        seed=args.seed,
        data_seed=args.seed,
        bf16=run.precision.bf16,
        fp16=run.precision.fp16,
        use_cpu=run.precision.device == "cpu",
        activation_checkpointing=False,  # (trl defaults its old alias gradient_checkpointing to True)
        torch_compile=args.compile,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        disable_tqdm=not is_main_process(),
    )
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------- several processes

def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world_size); joins the process group when torchrun started several processes
    (gloo on CPU, nccl on GPUs). `run_main` closes it after a successful run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_mean(x: torch.Tensor | float) -> float:
    """Mean of a scalar over processes."""
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(*models: torch.nn.Module) -> None:
    """Data parallelism by hand: after backward, every process holds the mean gradient."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for m in models:
        for p in m.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world


def close_process_group() -> None:
    """Tear down torch.distributed (torchrun runs) before the interpreter exits.

    Left alive, gloo's worker threads can outlive Python's finalisation and abort the process
    (SIGABRT, "terminate called without an active exception") after a successful run. Only called
    on success: if one rank failed, the others may be inside a collective and a barrier would hang.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_main(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Entry point of every script: user errors become one clear line and exit code 2."""
    from dataset.jsonl import DataError

    try:
        main(None)
    except (StageError, DataError) as e:
        logger.error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        logger.warning("interrupted; continue later with --resume")
        sys.exit(130)
    else:
        close_process_group()


# ----------------------------------------------------------------------------- random number generators

def rng_state() -> dict[str, Any]:
    """Every generator a stage draws from (Python, NumPy, torch CPU and CUDA), as tensors and plain
    values, so `torch.load(..., weights_only=True)` can read it back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`: the next random number drawn is the one the saved run drew next."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    """random.setstate wants tuples; a round trip through some loaders gives lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
