"""Command-line flags as dataclasses, composed per stage from groups, so `--help` lists only what a
stage reads.

A stage declares `class SFTArgs(RunFlags, DataFlags, ScheduleFlags, CheckpointFlags, HardwareFlags,
TrainerFlags)` and adds or re-defaults its own fields; `parse_args` turns the fields into argparse
options (help text and default from `flag(...)`), reads `--config FILE.yaml` as defaults (the
command line wins, an unknown key is an error) and checks flags declared `positive=True`.

    group            flags                                              read by
    RunFlags         out_dir, config                                    every stage
    DataFlags        data, eval_data, skip_bad_lines                    every stage
    InitFlags        init_from                                          every stage after the tokenizer
    ScheduleFlags    seed, max_steps, epochs, batch_size, lr, warmup_ratio, weight_decay, max_grad_norm
    CheckpointFlags  logging_steps, save_steps, eval_steps, save_total_limit, resume
    HardwareFlags    device, dtype
    TrainerFlags     grad_accum, compile                               stages run by transformers.Trainer
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


def flag(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that is also a command-line flag (`extra`: choices=..., positive=True)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunFlags:
    out_dir: str = flag("training", "root of all outputs: <out_dir>/<stage>/checkpoint-<step>, <out_dir>/<stage>/runs")
    config: str | None = flag(None, "YAML file of flags (keys = flag names); command-line flags win")


@dataclass
class DataFlags:
    data: str | None = flag(None, "training jsonl; default: MiniMind's file under dataset/ if present, "
                                  "else the embedded demo dataset")
    eval_data: str | None = flag(None, "held-out jsonl; default: the demo's eval split, or the tail of --data")
    skip_bad_lines: bool = flag(False, "skip malformed data lines (counted in the log) instead of stopping")


@dataclass
class InitFlags:
    init_from: str | None = flag(None, "start from this stage's latest checkpoint (a stage name) or a model dir")


@dataclass
class ScheduleFlags:
    seed: int = flag(42, "random seed (model init, data order, dropout, sampling)")
    max_steps: int = flag(-1, "optimizer steps to run; -1 = run --epochs")
    epochs: float = flag(1.0, "passes over the training data (ignored when --max_steps > 0)")
    batch_size: int = flag(16, "sequences per device per micro-batch")
    lr: float = flag(5e-4, "peak learning rate (cosine schedule with warmup)")
    warmup_ratio: float = flag(0.05, "share of steps spent warming the learning rate up")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm")


@dataclass
class CheckpointFlags:
    logging_steps: int = flag(10, "log loss/lr/tokens-per-second every N steps")
    save_steps: int = flag(500, "save a checkpoint every N steps (and always at the end)")
    eval_steps: int = flag(200, "evaluate on held-out data every N steps")
    save_total_limit: int = flag(2, "keep only the N most recent checkpoints")
    resume: bool = flag(False, "continue this stage from its latest checkpoint: weights, optimizer, "
                               "scheduler, RNG and data position")


@dataclass
class HardwareFlags:
    device: str = flag("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = flag("auto", "auto (bf16 on a capable GPU, fp32 on CPU), fp32, bf16 or fp16",
                      choices=("auto", "fp32", "bf16", "fp16"))


@dataclass
class TrainerFlags:
    grad_accum: int = flag(1, "micro-batches accumulated per optimizer step")
    compile: bool = flag(False, "torch.compile the model (on this course's CPU: no faster at the tiny preset "
                                "after ~75 s of compiling; measure with scripts/bench_model.py --compile)")


A = TypeVar("A")


def _base_type(tp: Any) -> Any:
    """`int | None` -> int, `str` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(t for t in typing.get_args(tp) if t is not type(None))
    return tp


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
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
    if getattr(known, "config", None):
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
            parser.error(f"--config {path}: unknown flag(s) {', '.join(unknown)} (this stage reads: "
                         f"{', '.join(sorted(names))})")
        parser.set_defaults(**values)
    args = cls(**vars(parser.parse_args(argv)))
    for f in dataclasses.fields(cls):  # flags declared with positive=True (a temperature, a size)
        value = getattr(args, f.name)
        if f.metadata.get("positive") and value is not None and value <= 0:
            parser.error(f"--{f.name} {value}: must be > 0")
    return args


def merge_repeated_flag(argv: Sequence[str] | None, name: str) -> list[str]:
    """`--reward a --reward b,c` -> `--reward a,b,c` (argparse would keep only the last)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(name + "="):
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([name, ",".join(values)] if values else [])
