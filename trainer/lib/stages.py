"""The course's stages, in order, and the checkpoints they leave for each other.

Every stage writes `<out_dir>/<stage>/checkpoint-<step>/` (a loadable model dir; the tokenizer stage
writes `<out_dir>/tokenizer/`), and starts from its parent's latest output unless `--init_from`
names another. A missing parent is a `StageError` that names the command creating it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

REPO_ROOT = Path(__file__).resolve().parents[2]


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

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# Written into a checkpoint dir after everything else (weights, optimizer, RNG, trainer state): a
# dir without it is a save that was cut off (a kill, a full disk) and is never picked up.
COMPLETE = "checkpoint.complete"


def mark_complete(path: Path) -> None:
    (path / COMPLETE).write_text("every file of this checkpoint was written\n")


@contextmanager
def rewriting(path: Path) -> Iterator[Path]:
    """Change files of a finished checkpoint (merge LoRA into it, add the final save): unmarked
    while it changes, marked again only if the change completed."""
    (path / COMPLETE).unlink(missing_ok=True)
    yield path
    mark_complete(path)


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """Every complete `checkpoint-<step>` (one holding COMPLETE) as (step, path), oldest first."""
    if not stage_dir.is_dir():
        return []
    return sorted((int(m[1]), p) for p in stage_dir.iterdir()
                  if (m := CHECKPOINT_RE.match(p.name)) and (p / COMPLETE).is_file())


def unmarked_note(stage_dir: Path) -> str:
    """For a "no checkpoint" error: the checkpoint dirs that exist but are not marked complete."""
    unmarked = sorted(p.name for p in stage_dir.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE).is_file()) \
        if stage_dir.is_dir() else []
    if not unmarked:
        return ""
    return (f" ({', '.join(unmarked)} there {'is' if len(unmarked) == 1 else 'are'} not marked complete: a save that "
            f"was cut off, or one written before {COMPLETE} existed; if its files are whole, "
            f"`touch {stage_dir / unmarked[-1] / COMPLETE}` makes it count)")


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step, or None."""
    found = checkpoints(stage_dir)
    return found[-1][1] if found else None


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
            raise StageError(f"{flag} {value}: no {value} checkpoint under {out_dir / value}"
                             f"{unmarked_note(out_dir / value)}. Create it with: {creating_command(value, out_dir)}")
        return found
    path = Path(value)
    if not path.exists():
        raise StageError(f"{flag} {value}: neither a stage name ({', '.join(STAGES)}) nor an existing path")
    return latest_checkpoint(path) or path


# What a stage can start from, by the class names transformers writes into config.json "architectures".
MODEL_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "causal_lm": ("a causal language model (...ForCausalLM)", ("ForCausalLM", "ForConditionalGeneration", "VLM")),
    "reward": ("a reward model (...ForSequenceClassification, made by python trainer/train_5_reward.py)",
               ("ForSequenceClassification",)),
    "any": ("a model checkpoint", ("",)),
}


def _describe(architecture: str) -> str:
    for kind, suffix in (("reward model (a sequence classifier)", "ForSequenceClassification"),
                         ("causal language model", "ForCausalLM")):
        if architecture.endswith(suffix):
            return kind
    return "model"


def check_model_dir(path: Path, kind: str = "causal_lm", flag: str = "--init_from") -> Path:
    """`path` if it is a model dir of `kind` whose tokenizer fits its embedding, else a StageError that says
    which of the three is wrong: no config.json (not a checkpoint), another architecture, or a tokenizer
    with more tokens than the model's `vocab_size` (tokenizer and weights from different runs)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise StageError(f"{flag} {path}: not a model checkpoint (no config.json); give a stage name "
                         f"({', '.join(s for s in STAGES if s != 'tokenizer')}) or a checkpoint-<step> dir")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{config_file}: not a readable JSON model config ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise StageError(f"{config_file}: field 'model_type' missing: not a transformers model config")
    wanted, suffixes = MODEL_KINDS[kind]
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(s) for a in architectures for s in suffixes):
        raise StageError(f"{flag} {path}: a {_describe(architectures[0])} ({', '.join(architectures)}), "
                         f"but this needs {wanted}")
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if vocab and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        n_tokens = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if n_tokens > vocab:
            raise StageError(f"{path}: the tokenizer has {n_tokens} tokens but config.json field 'vocab_size' is "
                             f"{vocab}: tokenizer and weights come from different runs (ids >= {vocab} have no "
                             f"embedding); save the tokenizer the model was trained with beside it")
    return path


def resolve_model(value: str, out_dir: Path, kind: str = "causal_lm", flag: str = "--init_from") -> Path:
    """A flag naming a model (a stage name, a stage dir or a model dir) -> its dir, checked by `check_model_dir`."""
    return check_model_dir(resolve_stage_or_path(value, out_dir, flag), kind, flag)


def resolve_init(stage: str, out_dir: str | Path, init_from: str | None = None, parent: str | None = None) -> Path:
    """The checkpoint a stage starts from: `init_from`, else its parent stage's latest output; checked to be
    a causal LM (`check_model_dir`) unless it is the tokenizer dir that pretraining starts from."""
    out_dir = Path(out_dir)
    if init_from:
        path = resolve_stage_or_path(init_from, out_dir)
    else:
        parent = parent or STAGES[stage].parent
        assert parent is not None, f"stage {stage} has no parent"
        path = stage_output(out_dir, parent)
        if path is None:
            raise StageError(f"stage {stage} starts from the {parent} stage, but {out_dir / parent} has no "
                             f"{'tokenizer' if parent == 'tokenizer' else 'checkpoint'} yet{unmarked_note(out_dir / parent)}. "
                             f"Create it with: {creating_command(parent, out_dir)}")
    if stage != "pretrain":
        check_model_dir(path)
    logger.info(f"starting from {path}")
    return path


def resume_checkpoint(stage_dir: Path, resume: bool, needs: str = "config.json") -> Path | None:
    """With --resume, the latest checkpoint of this very stage (error if there is none)."""
    if not resume:
        return None
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is None or not (ckpt / needs).is_file():
        raise StageError(f"--resume: no checkpoint in {stage_dir} to resume from{unmarked_note(stage_dir)}; "
                         f"run without --resume first")
    logger.info(f"resuming from {ckpt}")
    return ckpt
