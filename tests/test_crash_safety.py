"""A real training subprocess SIGKILLed in the middle of a save and in the middle of a step
(pretraining), and in the middle of a save (SFT, DPO, GRPO, the reward model, the VLM): the cut-off
checkpoint is never picked up, the previous one loads, and --resume ends on the same weights as a
run that was never interrupted. The kill comes from a `sitecustomize` put on the
subprocess's PYTHONPATH (the course's code has no test hooks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from trainer.lib.stages import COMPLETE, checkpoints, latest_checkpoint

KILLER = '''
import os, signal
mode, at = os.environ.get("CRASH_MODE"), int(os.environ.get("CRASH_AT", "0"))
if mode:
    import transformers.trainer as t
    calls = [0]
    # "save": the weights of checkpoint number `at` are on disk, its optimizer is not yet.
    # "step": the process dies inside training step number `at`.
    name = {"save": "_save_optimizer_and_scheduler", "step": "training_step"}[mode]
    original = getattr(t.Trainer, name)

    def dying(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    setattr(t.Trainer, name, dying)
'''


def killer_env(tmp_path) -> dict[str, str]:
    """The environment of a stage subprocess that dies where CRASH_MODE / CRASH_AT say (KILLER)."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILLER)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(REPO_ROOT)])}


@pytest.fixture
def pretrain(plumb_corpus, plumb_tokenizer_out, tmp_path):
    env = killer_env(tmp_path)

    def run(out, *extra, crash: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "trainer/train_1_pretrain.py", "--data", str(plumb_corpus["pretrain_train"]),
               "--eval_data", str(plumb_corpus["pretrain_eval"]), "--init_from", str(plumb_tokenizer_out / "tokenizer"),
               "--out_dir", str(out), "--max_length", "32", "--batch_size", "4", "--max_steps", "8",
               "--logging_steps", "1", "--eval_steps", "100", "--save_steps", "2", "--max_eval_blocks", "2",
               "--sample_prompts", "Tom has", "--dtype", "fp32", "--device", "cpu", *extra]
        crash_env = {"CRASH_MODE": crash[0], "CRASH_AT": str(crash[1])} if crash else {}
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**env, **crash_env})

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    return run, load_file(tmp_path / "full" / "pretrain" / "checkpoint-8" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_killed_during_a_save_leaves_the_previous_checkpoint_and_resumes_exactly(pretrain, tmp_path):
    from transformers import AutoModelForCausalLM

    run, expected = pretrain
    out = tmp_path / "killed"
    killed = run(out, crash=("save", 2))  # the second save, at step 4
    assert killed.returncode == -9
    cut = out / "pretrain" / "checkpoint-4"
    assert (cut / "model.safetensors").is_file() and not (cut / "optimizer.pt").exists()  # really cut mid-save
    assert not (cut / COMPLETE).exists()
    assert [p.name for _, p in checkpoints(out / "pretrain")] == ["checkpoint-2"]
    AutoModelForCausalLM.from_pretrained(latest_checkpoint(out / "pretrain"))  # the previous one loads

    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stderr  # it resumed from the complete one
    assert_same_weights(load_file(out / "pretrain" / "checkpoint-8" / "model.safetensors"), expected)


def test_killed_during_a_step_resumes_exactly(pretrain, tmp_path):
    run, expected = pretrain
    out = tmp_path / "killed"
    killed = run(out, crash=("step", 6))
    assert killed.returncode == -9
    assert latest_checkpoint(out / "pretrain").name == "checkpoint-4"
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_file(out / "pretrain" / "checkpoint-8" / "model.safetensors"), expected)


def _stage_argv(stage: str, rl_models: dict) -> list[str]:
    """CLI of one stage on the tiny rl_models fixtures: 4 steps, a checkpoint every 2."""
    common = ["--max_steps", "4", "--batch_size", "4", "--logging_steps", "1", "--save_steps", "2",
              "--save_total_limit", "3", "--seed", "3", "--eval_steps", "100", "--device", "cpu",
              "--init_from", str(rl_models["policy"])]
    script, extra = {
        "sft": ("train_2_sft", ["--data", rl_models["sft_train"], "--eval_data", rl_models["sft_eval"],
                                "--max_length", "128", "--eval_answers", "0"]),
        "dpo": ("train_3_dpo", ["--data", rl_models["dpo_train"], "--eval_data", rl_models["dpo_eval"], "--lr", "1e-3",
                                "--eval_answers", "0"]),
        "grpo": ("train_4_grpo", ["--data", rl_models["rl_train"], "--eval_data", rl_models["rl_eval"],
                                  "--num_generations", "2", "--max_completion_length", "8", "--max_eval_prompts", "2"]),
        "reward": ("train_5_reward", ["--data", rl_models["dpo_train"], "--eval_data", rl_models["dpo_eval"],
                                      "--max_length", "256"]),
    }[stage]
    return [f"trainer/{script}.py", *common, *map(str, extra)]


def _vlm_argv(stage_out_dir, tmp_path) -> list[str]:
    """The VLM stage, both phases (4 steps each, a checkpoint every 2), on 32 one-colour pictures."""
    from test_vlm_stage import TINY_VIT, colour_parquet

    data = tmp_path / "colours.parquet"
    colour_parquet(data, 32)
    return ["trainer/train_7_vlm.py", "--init_from", str(stage_out_dir / "pretrain" / "checkpoint-1"), "--data", str(data),
            "--batch_size", "8", "--eval_answers", "2", "--logging_steps", "1", "--max_steps", "4", "--save_steps", "2",
            "--save_total_limit", "3", "--device", "cpu", *TINY_VIT]


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "reward", "vlm"])
def test_every_trainer_stage_killed_during_a_save_resumes_from_the_last_complete_checkpoint(
        stage, rl_models, stage_out_dir, tmp_path):
    """The same SIGKILL in the middle of the second save (step 4; the VLM: of its second phase), for
    every other Trainer stage: the cut checkpoint is never picked up and --resume ends on the weights
    of a run that was never killed. (PPO writes its own checkpoints: its SIGKILL test is in
    test_ppo.py.)"""
    env = killer_env(tmp_path)
    argv = _vlm_argv(stage_out_dir, tmp_path) if stage == "vlm" else _stage_argv(stage, rl_models)
    kill_at = 4 if stage == "vlm" else 2  # phase 1 of the VLM saves twice first (vlm/align/)

    def run(out, *extra, crash: bool = False) -> subprocess.CompletedProcess:
        crash_env = {"CRASH_MODE": "save", "CRASH_AT": str(kill_at)} if crash else {}
        return subprocess.run([sys.executable, *argv, "--out_dir", str(out), *extra], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300, env={**env, **crash_env})

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(tmp_path / "killed", crash=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    stage_dir = tmp_path / "killed" / stage
    cut = stage_dir / "checkpoint-4"
    assert cut.is_dir() and not (cut / COMPLETE).exists()  # really cut mid-save
    assert latest_checkpoint(stage_dir).name == "checkpoint-2"
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_file(stage_dir / "checkpoint-4" / "model.safetensors"),
                        load_file(tmp_path / "full" / stage / "checkpoint-4" / "model.safetensors"))
