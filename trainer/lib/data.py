"""Where a stage's data comes from, and how a held-out part is set aside when none is given.

Order: `--data`; else MiniMind's file under dataset/ (pretrain_t2t_mini.jsonl, sft_t2t_mini.jsonl,
dpo.jsonl, rlaif.jsonl, or the older names); else the embedded demo world, generated once into
<out_dir>/demo_data/ with its own disjoint eval split. Without an eval file, `hold_out` keeps the
tail of the training records for evaluation, the one rule every stage uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from dataset.jsonl import find_default_file, load_records
from trainer.lib.stages import REPO_ROOT, StageError

T = TypeVar("T")

# Without an eval file, this share of the training records (at most a stage's --max_eval_* cap,
# at least one) is held out: the tail, never trained on.
HELD_OUT_FRACTION = 0.05


@dataclass(frozen=True)
class DataFiles:
    train: Path
    eval: Path | None
    demo: bool


def resolve_data(args: Any, kind: str) -> DataFiles:
    """Training and held-out files for a record kind (pretrain, sft, dpo, rl), from a stage's DataFlags."""
    from dataset.demo import write_demo_data

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
    demo = write_demo_data(Path(args.out_dir) / "demo_data")
    logger.info(f"no --data and no MiniMind {kind} file under dataset/: using the embedded demo dataset "
                f"({demo[f'{kind}_train']})")
    return DataFiles(demo[f"{kind}_train"], eval_path or demo[f"{kind}_eval"], demo=True)


def held_out_count(n: int, max_eval: int) -> int:
    """How many of `n` training records `hold_out` sets aside: 5%, at least 1, at most `max_eval`."""
    return max(1, min(max_eval, int(n * HELD_OUT_FRACTION)))


def hold_out(rows: Sequence[T], max_eval: int) -> tuple[Sequence[T], Sequence[T]]:
    """(train, held-out): the tail of `rows` (see `held_out_count`) is the held-out part.
    Works on lists, datasets.Dataset and torch Datasets (anything with len and slicing or select)."""
    n_eval = held_out_count(len(rows), max_eval)
    n_train = len(rows) - n_eval
    if hasattr(rows, "select"):  # datasets.Dataset
        return rows.select(range(n_train)), rows.select(range(n_train, len(rows)))
    if isinstance(rows, (list, tuple)):
        return rows[:n_train], rows[n_train:]
    import torch

    return torch.utils.data.Subset(rows, range(n_train)), torch.utils.data.Subset(rows, range(n_train, len(rows)))


def train_and_eval(files: DataFiles, load, max_eval: int) -> tuple[Sequence, Sequence]:
    """`load(path)` both files, or hold out the tail of the training file; the eval part is capped
    at `max_eval` records."""
    train = load(files.train)
    if files.eval is not None:
        evals = load(files.eval)
    else:
        train, evals = hold_out(train, max_eval)
        logger.info(f"no held-out file: the last {len(evals)} records of {files.train} are held out")
    if len(evals) > max_eval:
        evals = evals.select(range(max_eval)) if hasattr(evals, "select") else evals[:max_eval]
    return train, evals


GT_NEEDED = ("the correctness reward grades answers against it (add the answer, drop such lines with "
             "--skip_bad_lines, or use rewards that need no answer such as format)")


def rl_rows(path: Path, skip_bad_lines: bool = False, need_gt: bool = False) -> list[dict]:
    """RL records as trl's conversational prompt format plus the `gt` column the rewards read; with
    `need_gt` (a correctness reward) a record without `gt` is a bad line, named with its line number."""
    required = {"gt": GT_NEEDED} if need_gt else None
    return [{"prompt": r["prompt"], "gt": r["gt"]}
            for r in load_records(path, "rl", skip_bad_lines=skip_bad_lines, required=required)]


def pair_rows(path: Path, skip_bad_lines: bool = False) -> list[dict]:
    """Preference records {"prompt", "chosen", "rejected"} (message lists: trl's conversational format)."""
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in load_records(path, "dpo", skip_bad_lines=skip_bad_lines)]


def chat_rows(path: Path, skip_bad_lines: bool = False) -> list[dict]:
    """Chat records as {"messages"} (trl's conversational language-modeling format)."""
    return [{"messages": r["messages"]} for r in load_records(path, "chat", skip_bad_lines=skip_bad_lines)]
