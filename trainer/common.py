"""Plumbing shared by every stage, written once: flags, checkpoints, data location, seeding,
device/precision, logging and the arguments every Trainer gets.

A stage script declares its flags as a dataclass deriving from `StageArgs`, then reads top to bottom:

    args = parse_args(SFTArgs, argv, __doc__)        # flags, --config FILE.yaml, --help
    run = start_stage("sft", args)                   # dirs, logging, seed, precision
    init = resolve_init("sft", args)                 # latest pretrain checkpoint (or --init_from)
    data = resolve_data(args, "sft")                 # --data, MiniMind's file, or the demo
    ... build the trainer, train, save ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from loguru import logger

REPO_ROOT = Path(__file__).resolve().parents[1]


class StageError(Exception):
    """An error the user can fix; printed as one clear message, without a traceback."""


@dataclass(frozen=True)
class Stage:
    name: str
    script: str
    parent: str | None


# Course order. `parent` is where a stage starts from by default (PPO also reads the reward model).
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("tokenizer", "trainer/train_0_tokenizer.py", None),
    Stage("pretrain", "trainer/train_1_pretrain.py", "tokenizer"),
    Stage("sft", "trainer/train_2_sft.py", "pretrain"),
    Stage("dpo", "trainer/train_3_dpo.py", "sft"),
    Stage("grpo", "trainer/train_4_grpo.py", "dpo"),
    Stage("reward", "trainer/train_5_reward.py", "sft"),
    Stage("ppo", "trainer/train_6_ppo.py", "dpo"),
    Stage("vlm", "trainer/train_7_vlm.py", "sft"),
]}


def _flag(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class StageArgs:
    """Flags every stage understands. Stages subclass this and may change defaults or add flags."""

    data: str | None = _flag(None, "training jsonl; default: MiniMind's file under dataset/ if present, "
                                   "else the embedded demo dataset")
    eval_data: str | None = _flag(None, "held-out jsonl; default: the demo's eval split, or a slice of --data")
    out_dir: str = _flag("training", "root of all outputs: <out_dir>/<stage>/checkpoint-<step>, <out_dir>/<stage>/runs")
    init_from: str | None = _flag(None, "start from this stage's latest checkpoint (a stage name) or a model dir")
    preset: str = _flag("tiny", "model size preset for stages that build a model (tiny, small, base, moe, tiny-moe)")
    max_steps: int = _flag(-1, "optimizer steps to run; -1 = run --epochs")
    epochs: float = _flag(1.0, "passes over the training data (ignored when --max_steps > 0)")
    batch_size: int = _flag(16, "sequences per device per micro-batch")
    grad_accum: int = _flag(1, "micro-batches accumulated per optimizer step")
    lr: float = _flag(5e-4, "peak learning rate (cosine schedule with warmup)")
    warmup_ratio: float = _flag(0.05, "share of steps spent warming the learning rate up")
    weight_decay: float = _flag(0.01, "AdamW weight decay")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm")
    max_length: int = _flag(256, "maximum tokens per training sequence")
    seed: int = _flag(42, "random seed (model init, data order, dropout)")
    logging_steps: int = _flag(10, "log loss/lr/tokens-per-second every N steps")
    save_steps: int = _flag(500, "save a checkpoint every N steps (and always at the end)")
    eval_steps: int = _flag(200, "evaluate on held-out data every N steps")
    save_total_limit: int = _flag(2, "keep only the N most recent checkpoints")
    resume: bool = _flag(False, "continue this stage from its latest checkpoint: weights, optimizer, "
                                "scheduler, RNG and data position")
    skip_bad_lines: bool = _flag(False, "skip malformed data lines (counted in the log) instead of stopping")
    device: str = _flag("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = _flag("auto", "auto (bf16 on a capable GPU, fp32 on CPU), fp32, bf16 or fp16",
                       choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = _flag(False, "torch.compile the model (1.1-1.5x faster steps, ~30 s to compile)")
    config: str | None = _flag(None, "YAML file of flags (keys = flag names); command-line flags win")


A = TypeVar("A", bound=StageArgs)


def _base_type(tp: Any) -> Any:
    """`int | None` -> int, `str` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(t for t in typing.get_args(tp) if t is not type(None))
    return tp


def build_parser(cls: type[StageArgs], description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, meta = _base_type(hints[f.name]), dict(f.metadata)
        kwargs: dict[str, Any] = {"default": f.default, "help": meta.get("help", "")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_args(cls: type[A], argv: Sequence[str] | None = None, description: str | None = None) -> A:
    """Flags from the command line, with `--config FILE.yaml` supplying defaults (CLI wins)."""
    parser = build_parser(cls, description)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            parser.error(f"--config {path}: not valid YAML ({e})")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a mapping of flag: value, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            parser.error(f"--config {path}: unknown flag(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    args = cls(**vars(parser.parse_args(argv)))
    for f in dataclasses.fields(cls):  # flags declared with positive=True (a temperature, a size)
        value = getattr(args, f.name)
        if f.metadata.get("positive") and value is not None and value <= 0:
            parser.error(f"--{f.name} {value}: must be > 0")
    return args


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


def start_stage(stage: str, args: StageArgs) -> StageRun:
    """Create the stage dir, set up logging, seed, choose precision; log what was chosen."""
    out_dir = Path(args.out_dir)
    sdir = out_dir / stage
    sdir.mkdir(parents=True, exist_ok=True)
    setup_logging(sdir / "train.log")
    seed_everything(args.seed)
    precision = pick_precision(args.device, args.dtype)
    # transformers 5.x dropped `logging_dir`: TensorBoard events go where this variable says.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(sdir / "runs")
    logger.info(f"stage {stage}: writing to {sdir} on {precision.device} ({str(precision.dtype).removeprefix('torch.')})")
    return StageRun(stage, out_dir, sdir, precision)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step (a dir without config.json is a save
    that was cut off, and is ignored)."""
    if not stage_dir.is_dir():
        return None
    found = [(int(m[1]), p) for p in stage_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / "config.json").is_file()]
    return max(found)[1] if found else None


def stage_output(out_dir: Path, stage: str) -> Path | None:
    """What a finished stage leaves for the next: the tokenizer dir, or the latest checkpoint."""
    if stage == "tokenizer":
        path = out_dir / "tokenizer"
        return path if (path / "tokenizer.json").is_file() else None
    return latest_checkpoint(out_dir / stage)


def creating_command(stage: str, out_dir: Path) -> str:
    cmd = f"python {STAGES[stage].script}"
    return cmd if str(out_dir) == "training" else f"{cmd} --out_dir {out_dir}"


def resolve_stage_or_path(value: str, out_dir: Path, flag: str = "--init_from") -> Path:
    """`--init_from` (or another `flag`) value -> a model/tokenizer dir: a stage name, a stage dir, or a model dir."""
    if value in STAGES:
        found = stage_output(out_dir, value)
        if found is None:
            raise StageError(f"{flag} {value}: no {value} checkpoint under {out_dir / value}. "
                             f"Create it with: {creating_command(value, out_dir)}")
        return found
    path = Path(value)
    if not path.exists():
        raise StageError(f"{flag} {value}: neither a stage name ({', '.join(STAGES)}) nor an existing path")
    return latest_checkpoint(path) or path


def resolve_init(stage: str, args: StageArgs, parent: str | None = None) -> Path:
    """The checkpoint a stage starts from: `--init_from`, else its parent stage's latest output."""
    out_dir = Path(args.out_dir)
    if args.init_from:
        path = resolve_stage_or_path(args.init_from, out_dir)
    else:
        parent = parent or STAGES[stage].parent
        assert parent is not None, f"stage {stage} has no parent"
        path = stage_output(out_dir, parent)
        if path is None:
            raise StageError(f"stage {stage} starts from the {parent} stage, but {out_dir / parent} has no "
                             f"{'tokenizer' if parent == 'tokenizer' else 'checkpoint'} yet. "
                             f"Create it with: {creating_command(parent, out_dir)}")
    logger.info(f"starting from {path}")
    return path


def resume_checkpoint(run: StageRun, args: StageArgs) -> Path | None:
    """With --resume, the latest checkpoint of this very stage (error if there is none)."""
    if not args.resume:
        return None
    ckpt = latest_checkpoint(run.dir)
    if ckpt is None:
        raise StageError(f"--resume: no checkpoint in {run.dir} to resume from; run without --resume first")
    logger.info(f"resuming from {ckpt}")
    return ckpt


@dataclass(frozen=True)
class DataFiles:
    train: Path
    eval: Path | None
    demo: bool


def resolve_data(args: StageArgs, kind: str, out_dir: Path | None = None) -> DataFiles:
    """Training and held-out files for a record kind (pretrain, sft, dpo, rl).

    Order: `--data`; else MiniMind's file under dataset/ (pretrain_t2t_mini.jsonl, sft_t2t_mini.jsonl,
    dpo.jsonl, rlaif.jsonl, or the older names); else the embedded demo, generated once into
    <out_dir>/demo_data/.
    """
    from dataset.demo import write_demo_data
    from dataset.jsonl import find_default_file

    eval_path = Path(args.eval_data) if args.eval_data else None
    if eval_path is not None and not eval_path.is_file():
        raise StageError(f"--eval_data {eval_path}: no such file")
    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise StageError(f"--data {path}: no such file")
        return DataFiles(path, eval_path, demo=False)
    default = find_default_file(kind, REPO_ROOT)
    if default is not None:
        logger.info(f"using MiniMind data file {default}")
        return DataFiles(default, eval_path, demo=False)
    demo = write_demo_data(Path(out_dir or args.out_dir) / "demo_data")
    logger.info(f"no --data and no MiniMind {kind} file under dataset/: using the embedded demo dataset "
                f"({demo[f'{kind}_train']})")
    return DataFiles(demo[f"{kind}_train"], eval_path or demo[f"{kind}_eval"], demo=True)


def trainer_kwargs(args: StageArgs, run: StageRun, has_eval: bool, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `transformers.TrainingArguments` and every trl `*Config` (they subclass it).

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


def close_process_group() -> None:
    """Tear down torch.distributed (torchrun runs) before the interpreter exits.

    Left alive, gloo's worker threads can outlive Python's finalisation and abort the process
    (SIGABRT, "terminate called without an active exception") after a successful run. Only called
    on success: if one rank failed, the others may be inside a collective and a barrier would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
