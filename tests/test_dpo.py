"""DPO: a stage run writes a loadable checkpoint and the reward curves, our implicit-reward metric
agrees with trl's, the loss flags map onto trl 1.16, and a missing SFT parent names its command."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

import model as mm  # noqa: F401
from dataset.jsonl import load_records
from trainer.lib.flags import parse_args
from trainer.lib.metrics import completion_logprobs, preference_accuracy
from trainer.lib.stages import StageError, latest_checkpoint
from trainer.train_3_dpo import DPOArgs, loss_settings, main


def test_dpo_stage_run_checkpoint_rewards_in_tensorboard_and_metric_agrees_with_trl(stage_copy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = stage_copy / "small_data"
    config = stage_copy / "pretrain" / "checkpoint-1" / "config.json"  # as trl's SFTTrainer saves it: a key that
    config.write_text(config.read_text().replace("{", '{"output_router_logits": false,', 1))  # trl reads as "MoE"
    trainer = main(["--out_dir", str(stage_copy), "--init_from", "pretrain", "--data", str(data / "dpo_train.jsonl"),
                    "--eval_data", str(data / "dpo_eval.jsonl"), "--max_steps", "3", "--batch_size", "4",
                    "--eval_steps", "3", "--logging_steps", "1", "--lr", "1e-3", "--sft_weight", "0.2"])
    ckpt = latest_checkpoint(stage_copy / "dpo")
    assert ckpt is not None and ckpt.name == "checkpoint-3"
    policy = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tags = set()
    for events in (stage_copy / "dpo" / "runs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert f"train/{name}" in tags and f"eval/{name}" in tags
    assert "eval/perplexity" not in tags  # exp(DPO loss) is not a perplexity

    # scripts/evaluate.py's pref_acc must measure what trl optimises: same margins on the same pairs.
    reference = AutoModelForCausalLM.from_pretrained(stage_copy / "pretrain" / "checkpoint-1").eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    pairs = load_records(data / "dpo_eval.jsonl", "dpo")
    prompts = [p["prompt"] for p in pairs]
    logps = {f"{name}_{side}": completion_logprobs(m, tok, prompts, [p[side] for p in pairs])
             for name, m in (("pi", policy), ("ref", reference)) for side in ("chosen", "rejected")}
    ours = preference_accuracy(logps["pi_chosen"], logps["pi_rejected"], logps["ref_chosen"], logps["ref_rejected"], 0.1)
    theirs = trainer.evaluate()
    assert ours["margin"] == pytest.approx(theirs["eval_rewards/margins"], abs=1e-4)
    assert ours["reward_chosen"] == pytest.approx(theirs["eval_rewards/chosen"], abs=1e-4)
    assert not torch.equal(policy.lm_head.weight, reference.lm_head.weight)


def test_loss_flags_map_onto_trl(tmp_path):
    def settings(*flags):
        return loss_settings(parse_args(DPOArgs, ["--out_dir", str(tmp_path), *flags]))

    # The default is DPO + an NLL term on the chosen replies (RPO); --sft_weight 0 is pure DPO.
    assert settings() == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0], "beta": 0.1,
                          "label_smoothing": 0.0}
    assert settings("--sft_weight", "0") == {"loss_type": ["sigmoid"], "loss_weights": [1.0], "beta": 0.1,
                                             "label_smoothing": 0.0}
    assert settings("--sft_weight", "0.5", "--loss_type", "ipo")["loss_type"] == ["ipo", "sft"]
    assert settings("--sft_weight", "0.5")["loss_weights"] == [1.0, 0.5]
    assert settings("--loss_type", "robust", "--label_smoothing", "0.1")["label_smoothing"] == 0.1
    for flags in (["--loss_type", "ipo", "--beta", "0.5"], ["--loss_type", "hinge", "--sft_weight", "1"]):
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **settings(*flags))
    with pytest.raises(StageError, match="robust"):
        settings("--label_smoothing", "0.1")
    with pytest.raises(SystemExit):
        settings("--loss_type", "nonsense")


def test_missing_sft_checkpoint_names_the_command(tmp_path):
    with pytest.raises(StageError, match=r"python trainer/train_2_sft\.py"):
        main(["--out_dir", str(tmp_path)])
