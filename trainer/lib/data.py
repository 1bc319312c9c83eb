"""Where a stage's data comes from, and how a held-out part is set aside when none is given.

Order: `--data`; else MiniMind's file under dataset/ (pretrain_t2t_mini.jsonl, sft_t2t_mini.jsonl,
dpo.jsonl, rlaif.jsonl, or the older names); else the embedded demo world, generated once into
<out_dir>/demo_data/ with its own disjoint eval split. Without an eval file, `hold_out` keeps the
tail of the training records for evaluation, the one rule every stage uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from dataset.jsonl import LoadReport, find_default_file, iter_records, load_records
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
    """Training and held-out files for a data kind (pretrain, sft, dpo, reward, rl), from a stage's DataFlags."""
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
    return [_pair(r) for r in load_records(path, "dpo", skip_bad_lines=skip_bad_lines)]


def _pair(r: dict) -> dict:
    return {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}


def _chat(r: dict) -> dict:
    return {"messages": r["messages"]}


def chat_rows(path: Path, skip_bad_lines: bool = False) -> list[dict]:
    """Chat records as {"messages"} (trl's conversational language-modeling format)."""
    return [_chat(r) for r in load_records(path, "chat", skip_bad_lines=skip_bad_lines)]


def chat_dataset(path: Path, cache_dir: Path, skip_bad_lines: bool = False):
    """`chat_rows` as a datasets.Dataset on disk (bounded memory for a file of any size)."""
    return disk_dataset(path, "chat", cache_dir, skip_bad_lines)


def pair_dataset(path: Path, cache_dir: Path, skip_bad_lines: bool = False):
    """`pair_rows` as a datasets.Dataset on disk (bounded memory for a file of any size)."""
    return disk_dataset(path, "dpo", cache_dir, skip_bad_lines)


ROW = {"chat": _chat, "dpo": _pair}


def _rows(path: str, kind: str, skip_bad_lines: bool, key: str = "", report: LoadReport | None = None,
          warn: bool = True) -> Iterator[dict]:
    """The generator datasets runs; module-level with plain arguments, so it fingerprints the cache by
    value (`key`: the file's path, size and mtime, so a changed file is read again)."""
    yield from map(ROW[kind], iter_records(path, kind, skip_bad_lines=skip_bad_lines, report=report, warn=warn))


def disk_dataset(source: Path, kind: str, cache_dir: Path, skip_bad_lines: bool = False, batch: int = 1000):
    """The `kind` records of `source` ("chat" or "dpo") as a datasets.Dataset written to Arrow files under `cache_dir` one batch at
    a time and memory-mapped back, so memory stays bounded however large the file (`Dataset.from_list`
    holds every record as Python objects and then a copy as Arrow: ~6x the file's size).

    Arrow needs one schema for all rows, and a message with `tool_calls` or `reasoning_content` may
    first appear on line 90,000, after the first batch fixed it. So the first pass streams the file
    and unifies each batch's schema (structs gain the fields any record has, missing ones are null,
    exactly as `from_list` does); the second writes the rows. Both are cached, keyed by the file's
    path, size and mtime: a second run with the same file reads the Arrow files directly."""
    import pyarrow as pa
    from datasets import Dataset, Features

    stat = source.stat()
    key = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    skip = "-skip" if skip_bad_lines else ""
    schema_file = cache_dir / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}{skip}.features.json"
    if schema_file.is_file():  # read before: say again what was skipped then
        saved = json.loads(schema_file.read_text())
        features = Features.from_dict(saved["features"])
        if saved["skipped"]:
            logger.warning(f"{source}: skipped {saved['skipped']} bad line(s); first: {saved['first']}")
    else:
        report, schemas = LoadReport(), []
        rows = _rows(str(source), kind, skip_bad_lines, report=report)
        while chunk := list(islice(rows, batch)):
            schemas.append(pa.Table.from_pylist(chunk).schema)
        features = Features.from_arrow_schema(pa.unify_schemas(schemas, promote_options="permissive"))
        saved = {"features": features.to_dict(), "skipped": report.skipped,
                 "first": "; ".join(str(e) for e in report.errors)}
        tmp = schema_file.with_suffix(f".{os.getpid()}.tmp")  # per process: torchrun ranks may race here
        tmp.write_text(json.dumps(saved))
        tmp.replace(schema_file)
    kwargs = {"path": str(source), "kind": kind, "skip_bad_lines": skip_bad_lines, "key": key, "warn": False}
    return Dataset.from_generator(_rows, features=features, gen_kwargs=kwargs, cache_dir=str(cache_dir),
                                  writer_batch_size=batch)
