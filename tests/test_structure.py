"""The layout the course promises: every registered stage has its script, every script's --help runs
and lists only the flags that stage reads, nothing edits sys.path, and trainer/ holds only stages."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from trainer.lib.stages import STAGES

SCRIPTS = sorted(str(p.relative_to(REPO_ROOT)) for p in [*REPO_ROOT.glob("trainer/train_*.py"),
                                                        *REPO_ROOT.glob("scripts/*.py")])


def test_every_registered_stage_has_its_script():
    for stage in STAGES.values():
        assert (REPO_ROOT / stage.script).is_file(), stage
    assert sorted(s.script for s in STAGES.values()) == sorted(p for p in SCRIPTS if p.startswith("trainer/"))


def test_trainer_root_holds_only_numbered_stages():
    names = sorted(p.name for p in (REPO_ROOT / "trainer").iterdir() if p.name != "__pycache__")
    assert names == sorted(["__init__.py", "lib", *(p.split("/")[-1] for p in SCRIPTS if p.startswith("trainer/"))])
    assert all(re.fullmatch(r"train_\d_[a-z]+\.py", n) for n in names if n not in ("__init__.py", "lib"))


def test_no_file_edits_sys_path():
    offenders = [str(p.relative_to(REPO_ROOT)) for folder in ("model", "dataset", "trainer", "scripts", "tests")
                 for p in (REPO_ROOT / folder).rglob("*.py") if "sys.path.insert" in p.read_text()
                 and p.name != "test_structure.py"]
    assert offenders == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_help_runs(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def _flags(args_class) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(args_class)}


def test_each_stage_lists_only_what_it_reads():
    from trainer.train_0_tokenizer import TokenizerArgs
    from trainer.train_1_pretrain import PretrainArgs
    from trainer.train_4_grpo import GRPOArgs
    from trainer.train_6_ppo import PPOArgs

    schedule = {"lr", "epochs", "max_steps", "batch_size", "warmup_ratio", "seed", "resume", "device", "compile"}
    assert not _flags(TokenizerArgs) & schedule
    assert not _flags(PPOArgs) & {"compile", "grad_accum", "max_length", "preset"}
    assert not _flags(GRPOArgs) & {"max_length", "preset"}
    assert "preset" in _flags(PretrainArgs)
    for args_class in (TokenizerArgs, PretrainArgs, GRPOArgs, PPOArgs):  # the common groups are there
        assert {"out_dir", "config", "data", "eval_data"} <= _flags(args_class)


def test_import_direction():
    """model/ and dataset/ never import trainer; a stage script never imports another stage script."""
    for folder in ("model", "dataset"):
        for p in (REPO_ROOT / folder).rglob("*.py"):
            assert not re.search(r"^\s*(from|import) trainer", p.read_text(), re.M), p
    for p in (REPO_ROOT / "trainer").glob("train_*.py"):
        assert not re.search(r"^\s*from trainer(\.train_| import train_)", p.read_text(), re.M), p
