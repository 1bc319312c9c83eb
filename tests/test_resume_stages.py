"""Exact resume and reproducibility for the Trainer stages after pretraining (SFT, DPO, GRPO, the
reward model): a run stopped after step 2 and continued with --resume ends on the very weights of
a run that was never stopped (fp32, CPU, same seed). Pretraining's own test is in
test_pretrain_stage.py, PPO's (a SIGKILL) in test_ppo.py, the VLM's in test_vlm_stage.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CountSteps, StopAt

pytestmark = pytest.mark.usefixtures("plumb_single_thread")

STEPS = 4


def _dense(model_dir: Path, dst: Path) -> Path:
    """A copy whose config says `output_router_logits: false`, as trl's SFTTrainer saves it."""
    dst = shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "output_router_logits": False}))
    return dst


def _stage(name: str, rl_models: dict, tmp_path: Path):
    """(main, argv(out_dir, *extra), stage dir name) for one stage on the tiny rl_models fixtures."""
    common = ["--max_steps", str(STEPS), "--batch_size", "4", "--logging_steps", "1", "--save_steps", "2",
              "--save_total_limit", "3", "--seed", "3"]
    if name == "sft":
        from trainer.train_2_sft import main
        extra = ["--data", str(rl_models["sft_train"]), "--eval_data", str(rl_models["sft_eval"]),
                 "--max_length", "128", "--eval_steps", "100", "--eval_answers", "0"]
    elif name == "dpo":
        from trainer.train_3_dpo import main
        extra = ["--data", str(rl_models["dpo_train"]), "--eval_data", str(rl_models["dpo_eval"]),
                 "--eval_steps", "100", "--lr", "1e-3"]
    elif name == "grpo":
        from trainer.train_4_grpo import main
        extra = ["--data", str(rl_models["rl_train"]), "--eval_data", str(rl_models["rl_eval"]),
                 "--num_generations", "2", "--max_completion_length", "8", "--max_eval_prompts", "2", "--eval_steps", "100",
                 "--reward", f"{__name__}:letter_share", "--beta", "0.1"]
    else:
        from trainer.train_5_reward import main
        extra = ["--data", str(rl_models["dpo_train"]), "--eval_data", str(rl_models["dpo_eval"]),
                 "--eval_steps", "100", "--max_length", "256"]
    policy = _dense(rl_models["policy"], tmp_path / "init")

    def argv(out: Path, *more: str) -> list[str]:
        return ["--out_dir", str(out), "--init_from", str(policy), *common, *extra, *more]

    return main, argv


def letter_share(prompts, completions, **columns) -> list[float]:
    """A reward an untrained model's samples differ on (correctness is 0 for all of them, so every
    advantage, and with it every update, would be zero and the test would compare nothing)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["sft", "dpo", "grpo", "reward"])
def test_stopped_and_resumed_equals_uninterrupted(name, rl_models, tmp_path):
    main, argv = _stage(name, rl_models, tmp_path)
    full = main(argv(tmp_path / "full"))
    assert full.state.global_step == STEPS

    cut = main(argv(tmp_path / "cut"), callbacks=[StopAt(2)])
    assert cut.state.global_step == 2
    counted = CountSteps()
    resumed = main(argv(tmp_path / "cut", "--resume"), callbacks=[counted])
    assert resumed.state.global_step == STEPS and counted.n == STEPS - 2  # it continued, not restarted
    assert _losses(resumed)[-2:] == _losses(full)[-2:]  # the same batches, the same updates

    a = _weights(tmp_path / "full" / name / f"checkpoint-{STEPS}")
    b = _weights(tmp_path / "cut" / name / f"checkpoint-{STEPS}")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    start = _weights(tmp_path / "init")
    assert any(not torch.equal(a[k], start[k]) for k in start if k in a)  # it trained


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_same_seed_same_curve_other_seed_another(name, rl_models, tmp_path):
    main, argv = _stage(name, rl_models, tmp_path)
    first = _losses(main(argv(tmp_path / "a")))
    again = _losses(main(argv(tmp_path / "b")))
    other = _losses(main(argv(tmp_path / "c", "--seed", "4")))
    assert len(first) == STEPS
    assert first == again
    assert first != other
    assert any(loss != 0 for loss in first)  # something was learned, so equal curves mean something
