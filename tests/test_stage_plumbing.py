"""Shared stage plumbing (trainer/lib/flags.py, stages.py, runtime.py): --config YAML, errors that name the fix, stage discovery."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.lib.flags import parse_args
from trainer.lib.stages import REPO_ROOT, StageError, latest_checkpoint, mark_complete, resolve_init, resolve_stage_or_path
from trainer.train_1_pretrain import PretrainArgs

pytestmark = pytest.mark.usefixtures("plumb_single_thread")


def test_config_yaml_sets_flags_and_cli_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.5\nbatch_size: 3\nresume: true\nsample_prompts: 'a|b'\n")
    args = parse_args(PretrainArgs, ["--config", str(cfg), "--lr", "0.1", "--no-resume"])
    assert args.batch_size == 3 and args.sample_prompts == "a|b"  # from the file
    assert args.lr == 0.1 and args.resume is False  # the command line wins
    assert parse_args(PretrainArgs, ["--config", str(cfg)]).resume is True
    assert parse_args(PretrainArgs, []).lr == 2e-3  # the stage's own default when there is no file


def test_config_yaml_unknown_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.5\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        parse_args(PretrainArgs, ["--config", str(cfg)])
    assert e.value.code == 2
    assert "unknown flag(s) learning_rate" in capsys.readouterr().err


def test_positive_flags_reject_zero_from_cli_and_config(tmp_path, capsys):
    from trainer.train_4_grpo import GRPOArgs
    from trainer.train_6_ppo import PPOArgs

    for cls in (GRPOArgs, PPOArgs):
        with pytest.raises(SystemExit) as e:
            parse_args(cls, ["--temperature", "0"])
        assert e.value.code == 2
        assert "--temperature 0.0: must be > 0" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("temperature: -1\n")
    with pytest.raises(SystemExit):
        parse_args(GRPOArgs, ["--config", str(cfg)])
    assert "--temperature -1" in capsys.readouterr().err
    assert parse_args(GRPOArgs, ["--temperature", "0.3"]).temperature == 0.3


def test_missing_parent_names_the_command(tmp_path):
    args = parse_args(PretrainArgs, ["--out_dir", str(tmp_path)])
    with pytest.raises(StageError, match=r"Create it with: python trainer/train_0_tokenizer.py --out_dir"):
        resolve_init("pretrain", args.out_dir, args.init_from)
    with pytest.raises(StageError, match=r"--stage sft: no sft checkpoint .* python trainer/train_2_sft.py"):
        resolve_stage_or_path("sft", tmp_path, flag="--stage")


def test_missing_parent_exits_2_with_one_line(tmp_path):
    """The script itself: exit code 2 and one readable line, no traceback."""
    proc = subprocess.run([sys.executable, "trainer/train_1_pretrain.py", "--out_dir", str(tmp_path / "empty")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "python trainer/train_0_tokenizer.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_latest_checkpoint_skips_incomplete_saves(tmp_path):
    for step, complete in ((5, True), (20, True), (100, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "config.json").write_text("{}")  # a cut-off save has its config, but not the marker
        if complete:
            mark_complete(d)
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"  # numeric order, cut-off save ignored
    assert resolve_stage_or_path(str(tmp_path), Path("unused")) == tmp_path / "checkpoint-20"


def test_an_unmarked_checkpoint_is_named_in_the_missing_parent_error(tmp_path):
    (tmp_path / "pretrain" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / "pretrain" / "checkpoint-8" / "config.json").write_text("{}")
    with pytest.raises(StageError, match=r"checkpoint-8 there is not marked complete.*touch .*checkpoint-8/checkpoint.complete"):
        resolve_init("sft", tmp_path)


def test_run_main_destroys_the_process_group_after_a_successful_run(tmp_path):
    """A torchrun worker must not exit with gloo alive: its threads can abort the interpreter's shutdown."""
    import torch.distributed as dist

    from trainer.lib.runtime import run_main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seen = []
        run_main(lambda argv: seen.append(dist.is_initialized()))
        assert seen == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_stage_report_keeps_n_and_stderr_and_the_first_runs_before_on_resume(tmp_path):
    import json

    from trainer.lib.report import StageReport
    from trainer.lib.runtime import StageRun, pick_precision

    run = StageRun("x", tmp_path, tmp_path / "x", pick_precision("cpu", "fp32"))
    run.dir.mkdir()
    report = StageReport(run)
    report.before("accuracy", 0.2, higher_is_better=True, n=100)
    report.before("loss", 2.0, higher_is_better=False)
    report.after("accuracy", 0.5)
    report.after("loss", 1.0)
    report.save(10)
    m = json.loads((run.dir / "metrics.json").read_text())
    assert m["accuracy"] == {"before": 0.2, "after": 0.5, "higher_is_better": True, "n": 100,
                             "before_stderr": pytest.approx(0.04), "after_stderr": pytest.approx(0.05)}
    assert set(m["loss"]) == {"before", "after", "higher_is_better"}
    resumed = StageReport(run, resume=True)
    assert resumed.before("accuracy", lambda: 1 / 0, higher_is_better=True, n=100) == 0.2


@pytest.mark.parametrize("script", ["train_2_sft", "train_3_dpo", "train_4_grpo", "train_5_reward"])
def test_start_up_prints_no_warning_a_user_cannot_act_on(script):
    """trl's import pulls in bitsandbytes, whose CPU backend warns about an optional kernel package."""
    done = subprocess.run([sys.executable, f"trainer/{script}.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert "Failed to load CPU gemm_4bit_forward" not in done.stderr, done.stderr


def test_deepspeed_does_not_warn_that_a_cpu_run_uses_the_cpu():
    """Where DeepSpeed is installed, a Trainer stage imports it when it builds its trainer, and it
    warns that it is "setting accelerator to CPU" on a machine without a GPU."""
    pytest.importorskip("deepspeed")
    code = "import trainer.train_3_dpo\nfrom deepspeed.accelerator import get_accelerator\nprint(get_accelerator().device_name())"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_each_stage_reads_its_own_demo_file(tmp_path):
    """Without --data the reward model trains on the demo's reward pairs (chain answers, PPO's prompts),
    DPO on the general pairs; evaluate.py's rm_acc reads the reward pairs' held-out file."""
    from types import SimpleNamespace

    from trainer.lib.data import resolve_data
    from trainer.lib.tasks import TASKS

    args = SimpleNamespace(data=None, eval_data=None, out_dir=str(tmp_path))
    reward, dpo = resolve_data(args, "reward"), resolve_data(args, "dpo")
    assert (reward.train.name, reward.eval.name, reward.demo) == ("reward_train.jsonl", "reward_eval.jsonl", True)
    assert (dpo.train.name, dpo.eval.name) == ("dpo_train.jsonl", "dpo_eval.jsonl")
    assert TASKS["rm_acc"].default_data == "reward_eval" and TASKS["pref_acc"].default_data == "dpo_eval"
