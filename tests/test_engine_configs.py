"""configs/accelerate/*.yaml: every key is one the installed accelerate accepts, the FSDP wrap class is
the model's decoder layer, the multi-CPU config and both DeepSpeed ZeRO configs really run a Trainer
stage on two CPU processes (DeepSpeed: where it is installed; CI installs it), and the model shards
under FSDP2 on two CPU processes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import launcher_env
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


def _accelerate_sft(config: Path, stage_out_dir: Path, out: Path, **env_extra: str) -> Path:
    """Two processes of `accelerate launch --config_file config` running SFT for 2 steps, with the
    held-out answers and a sample decoded (both generate, which under ZeRO-3 needs every process) ->
    the checkpoint it saved. (accelerate's MULTI_CPU + use_cpu launches one process without mpirun:
    the sample count catches a config that silently trains alone.)"""
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    data = stage_out_dir / "small_data"
    env = launcher_env(**env_extra)
    cmd = [exe, "launch", "--config_file", str(config), "--main_process_port", "0",
           "trainer/train_2_sft.py", "--out_dir", str(out), "--init_from", str(stage_out_dir / "pretrain" / "checkpoint-1"),
           "--data", str(data / "sft_train.jsonl"), "--eval_data", str(data / "sft_eval.jsonl"), "--max_steps", "2",
           "--batch_size", "2", "--eval_answers", "2", "--max_eval_conversations", "4", "--sample_prompts", "Hi",
           "--max_new_tokens", "4", "--save_steps", "100", "--eval_steps", "100", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "sample: Hi ->" in done.stderr + done.stdout  # the decode during evaluation finished
    writers = {p.name.split(".")[-2] for p in (out / "sft").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process of the two logs
    seen = json.loads((out / "sft" / "seen.json").read_text())
    assert seen["samples"] == 2 * 2 * 2  # steps x batch x processes: two processes really trained
    return latest_checkpoint(out / "sft")


@pytest.fixture(scope="module")
def multi_cpu_sft(stage_out_dir, tmp_path_factory) -> Path:
    return _accelerate_sft(REPO_ROOT / "configs" / "accelerate" / "multi_cpu.yaml", stage_out_dir,
                           tmp_path_factory.mktemp("multi_cpu"))


def test_accelerate_launch_multi_cpu_runs_sft_on_two_processes(multi_cpu_sft):
    assert multi_cpu_sft.name == "checkpoint-2"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_runs_sft_on_two_cpu_processes_and_matches_ddp(stage, multi_cpu_sft, stage_out_dir, tmp_path):
    """The shipped ZeRO config, on two CPU processes (DeepSpeed's CPU accelerator, gloo), fp32: the
    saved weights equal the DDP run's. ZeRO-3 also checks that decoding during training (samples,
    held-out answers) runs on every process: the weights are sharded, so a decode on the main process
    alone would wait for the others forever."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    raw = yaml.safe_load((REPO_ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    raw.update(num_processes=2, mixed_precision="no")  # bf16 is for the GPUs it is written for
    config = tmp_path / "zero.yaml"
    config.write_text(yaml.safe_dump(raw))
    ckpt = _accelerate_sft(config, stage_out_dir, tmp_path / "run", DS_ACCELERATOR="cpu")
    assert ckpt.name == "checkpoint-2"
    ddp = load_file(multi_cpu_sft / "model.safetensors")
    zero = load_file(ckpt / "model.safetensors")
    assert set(ddp) <= set(zero)  # ZeRO-2 also writes the tied lm_head.weight out
    for name, weight in ddp.items():
        diff = (zero[name] - weight).abs().max().item()
        assert diff < 1e-6, f"{name}: {diff:.3g} from the DDP run's weights"


FSDP_WORKER = '''
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import model as mm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
lm = mm.MiniMindForCausalLM(mm.config_from_preset("tiny"))
for layer in lm.model.layers:  # one shard unit per decoder layer, as configs/accelerate/fsdp.yaml says
    fully_shard(layer)
fully_shard(lm)  # the root unit: the tied embedding / lm_head and the final norm
opt = torch.optim.SGD(lm.parameters(), lr=0.2)
batch = torch.load(sys.argv[1])
mine = batch[rank::world]  # each process its half of the global batch
losses = []
for _ in range(3):
    loss = lm(input_ids=mine, labels=mine).loss
    loss.backward()  # FSDP reduce-scatters the gradients: their mean over the processes
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
sharded = type(lm.model.layers[0].mlp.gate_proj.weight).__name__
with open(f"{sys.argv[2]}/result_{rank}.json", "w") as f:  # a file each: their stdout lines can interleave
    json.dump({"rank": rank, "losses": losses, "param_type": sharded}, f)
dist.destroy_process_group()
'''


def test_fsdp2_shards_the_model_on_two_cpu_processes_and_matches_one_process(torchrun, tmp_path):
    """accelerate sends every CPU run to DDP (MULTI_CPU) whatever its FSDP config says, so the engine is
    checked here directly: torch's FSDP2 ``fully_shard`` per DecoderLayer on two gloo processes gives
    the same losses as one process on the whole batch (SGD: the mean of the shards' gradients is the
    full batch's gradient)."""
    import model as mm

    batch = torch.randint(0, mm.config_from_preset("tiny").vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    torchrun(str(tmp_path / "worker.py"), str(tmp_path / "batch.pt"), str(tmp_path))
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result_*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["param_type"] == "DTensor" for r in results)  # the weights really are sharded
    fsdp = [sum(step) / 2 for step in zip(*(r["losses"] for r in results))]

    torch.manual_seed(0)
    lm = mm.MiniMindForCausalLM(mm.config_from_preset("tiny"))
    opt = torch.optim.SGD(lm.parameters(), lr=0.2)
    single = []
    for _ in range(3):
        # the mean of the two halves' losses (equal-length rows: the whole batch's loss)
        halves = [lm(input_ids=batch[r::2], labels=batch[r::2]).loss for r in range(2)]
        loss = sum(halves) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        single.append(loss.item())
    assert single[-1] < single[0] - 0.05  # it learns, so equal losses compare real steps
    assert fsdp == pytest.approx(single, abs=1e-4)
