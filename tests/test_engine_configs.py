"""configs/accelerate/*.yaml: every key is one the installed accelerate accepts, the FSDP wrap class is
the model's decoder layer, and the multi-CPU config really runs a Trainer stage on two processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.lib.stages import REPO_ROOT, latest_checkpoint

CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_engines_a_user_grows_into_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"multi_cpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_keys_are_accepted_by_the_installed_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(path)  # raises on an unknown top-level key
    launch_flags = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(raw.get(section, {})) - launch_flags  # accelerate launch maps each key onto its flag
        assert not unknown, f"{path.name}: {section} keys accelerate {config.__class__.__module__} does not know: {unknown}"


def test_fsdp_wraps_the_models_decoder_layer():
    import model as mm

    raw = yaml.safe_load((REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    names = {type(m).__name__ for m in mm.MiniMindForCausalLM(mm.config_from_preset("tiny")).modules()}
    assert raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] in names


def test_accelerate_launch_multi_cpu_runs_sft_on_two_processes(stage_out_dir, tmp_path):
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    data = stage_out_dir / "small_data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [exe, "launch", "--config_file", "configs/accelerate/multi_cpu.yaml", "--main_process_port", "0",
           "trainer/train_2_sft.py", "--out_dir", str(tmp_path), "--init_from", str(stage_out_dir / "pretrain" / "checkpoint-1"),
           "--data", str(data / "sft_train.jsonl"), "--eval_data", str(data / "sft_eval.jsonl"), "--max_steps", "2",
           "--batch_size", "2", "--eval_answers", "0", "--max_eval_conversations", "4", "--sample_prompts", "Hi",
           "--max_new_tokens", "4", "--save_steps", "100", "--eval_steps", "100", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert latest_checkpoint(tmp_path / "sft").name == "checkpoint-2"
    writers = {p.name.split(".")[-2] for p in (tmp_path / "sft").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process of the two logs
