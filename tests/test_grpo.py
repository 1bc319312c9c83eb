"""The GRPO stage: flags reach trl's GRPOConfig, rewards load (or fail clearly), and a two-step CPU
run writes a loadable checkpoint and the TensorBoard tags the course points at."""

from __future__ import annotations

import pytest


def test_repeated_reward_flags_are_merged():
    from trainer.lib.flags import merge_repeated_flag

    argv = ["--reward", "correctness", "--beta", "0", "--reward=format,a.b:c"]
    assert merge_repeated_flag(argv, "--reward") == ["--beta", "0", "--reward", "correctness,format,a.b:c"]
    assert merge_repeated_flag(["--beta", "0"], "--reward") == ["--beta", "0"]


def test_reward_flags_are_checked():
    from trainer.lib.grading import build_rewards

    funcs, weights = build_rewards("correctness,format", "1,0.5")
    assert [f.__name__ for f in funcs] == ["correctness", "format_reward"] and weights == [1.0, 0.5]
    with pytest.raises(ValueError, match="2 values for 1 rewards"):
        build_rewards("correctness", "1,2")
    with pytest.raises(ValueError, match="cannot import module"):
        build_rewards("no_such_mod:f")


def test_loss_types_are_trls():
    import trl.trainer.grpo_config as grpo_config

    from trainer.train_4_grpo import LOSS_TYPES

    help_text = grpo_config.GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    for name in LOSS_TYPES:
        assert f"'{name}'" in help_text, name


def test_grpo_stage_runs_and_logs(rl_models, rl_events, tmp_path):
    """Also from a dense checkpoint whose config carries `output_router_logits` (trl's SFT writes it),
    which makes trl's GRPO ask a dense model for a load-balancing loss unless the stage turns it off."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from trainer.train_4_grpo import main

    policy = shutil.copytree(rl_models["policy"], tmp_path / "sft")
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "output_router_logits": False}))
    out = tmp_path / "out"
    trainer = main(["--out_dir", str(out), "--init_from", str(policy),
                    "--data", str(rl_models["rl_train"]), "--eval_data", str(rl_models["rl_eval"]),
                    "--max_steps", "2", "--batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
                    "--max_eval_prompts", "4", "--logging_steps", "1", "--reward", "correctness",
                    "--reward", "format", "--reward_weights", "1,0.5", "--loss_type", "dr_grpo", "--beta", "0.1"])
    assert trainer.state.global_step == 2
    ckpt = out / "grpo" / "checkpoint-2"
    AutoModelForCausalLM.from_pretrained(ckpt)
    assert (ckpt / "tokenizer.json").is_file()
    scalars = rl_events(out / "grpo" / "runs")
    for tag in ("train/reward", "train/reward_std", "train/rewards/correctness/mean", "train/rewards/correctness/std",
                "train/rewards/format_reward/mean", "train/rewards/format_reward/std", "train/kl", "train/entropy",
                "train/completions/mean_length", "train/clip_ratio/region_mean", "train/loss"):
        assert tag in scalars, tag
    assert [step for step, _ in scalars["eval/accuracy"]] == [0, 2]
