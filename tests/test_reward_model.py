"""The reward model: a CausalLM checkpoint loads into the sequence classifier (backbone kept,
score head new), pairwise accuracy is counted correctly, and the stage trains and saves."""

from __future__ import annotations

import pytest
import torch

from trainer.lib.metrics import pairwise_accuracy
from trainer.lib.reward_model import load_reward_model, reward_model_accuracy, reward_scores


def test_pairwise_accuracy_hand_built():
    chosen = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0])
    rejected = torch.tensor([0.0, 2.0, 4.0, -1.0, 4.9])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(3.5 / 5)  # the tie (2, 2) counts one half
    assert pairwise_accuracy(torch.zeros(4), torch.zeros(4)) == 0.5  # a constant scorer is at chance


class LengthRewardModel(torch.nn.Module):
    """A stand-in reward model: r = number of real tokens (longer answers win)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, **kwargs):
        return type("Out", (), {"logits": attention_mask.sum(-1, keepdim=True).float() + self.dummy})()


def test_reward_model_accuracy_scores_whole_conversations(rl_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rl_models["policy"])
    q = [{"role": "user", "content": "What is 2 + 3?"}]
    pairs = [
        {"prompt": q, "chosen": [{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": q, "chosen": [{"role": "assistant", "content": "The answer is 5."}],
         "rejected": [{"role": "assistant", "content": "2 + 3 = 6. The answer is 6."}]},
        {"prompt": q, "chosen": [{"role": "assistant", "content": "It is five. The answer is 5."}],
         "rejected": [{"role": "assistant", "content": "6"}]},
    ]
    assert reward_model_accuracy(LengthRewardModel(), tok, pairs, batch_size=2) == pytest.approx(2 / 3)
    # Scores are read over the chat-templated conversation, as trl's RewardTrainer formats pairs.
    text = tok.apply_chat_template(q + [{"role": "assistant", "content": "5"}], tokenize=False)
    score = reward_scores(LengthRewardModel(), tok, [q], ["5"])
    assert score.item() == len(tok(text, add_special_tokens=False)["input_ids"])


def test_causal_lm_checkpoint_loads_into_reward_model(rl_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import MiniMindForSequenceClassification

    tok = AutoTokenizer.from_pretrained(rl_models["policy"])
    lm = AutoModelForCausalLM.from_pretrained(rl_models["policy"])
    rm = load_reward_model(rl_models["policy"], torch.float32, tok.pad_token_id)
    assert isinstance(rm, MiniMindForSequenceClassification) and rm.config.num_labels == 1
    assert rm.config.pad_token_id == tok.pad_token_id
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, rm.model.state_dict()[key]), key
    assert rm.score.weight.shape == (1, lm.config.hidden_size) and rm.score.weight.abs().sum() > 0


def test_reward_stage_trains_and_reports_accuracy(rl_models, rl_events, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from trainer.train_5_reward import main

    out = tmp_path / "out"
    trainer = main(["--out_dir", str(out), "--init_from", str(rl_models["policy"]),
                    "--data", str(rl_models["dpo_train"]), "--eval_data", str(rl_models["dpo_eval"]),
                    "--max_steps", "2", "--batch_size", "4", "--logging_steps", "1", "--eval_steps", "1",
                    "--max_length", "256"])
    assert trainer.state.global_step == 2
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward" / "checkpoint-2")
    assert rm.config.num_labels == 1
    scalars = rl_events(out / "reward" / "runs")
    assert [step for step, _ in scalars["eval/pairwise_accuracy"]] == [0, 2]
    for tag in ("train/loss", "train/accuracy", "train/margin", "eval/accuracy", "eval/loss"):
        assert tag in scalars, tag
    # Our count and trl's agree on the same held-out pairs with the same weights.
    ours = dict(scalars["eval/pairwise_accuracy"])[2]
    trls = dict(scalars["eval/accuracy"])[2]
    assert ours == pytest.approx(trls)


def test_pairs_longer_than_max_length_are_left_out_loudly(rl_models):
    from loguru import logger
    from transformers import AutoTokenizer

    from trainer.lib.generation import chat_ids
    from trainer.train_5_reward import fitting_pairs

    tok = AutoTokenizer.from_pretrained(rl_models["policy"])
    q = [{"role": "user", "content": "What is 2 + 3?"}]
    short = {"prompt": q, "chosen": [{"role": "assistant", "content": "The answer is 5."}],
             "rejected": [{"role": "assistant", "content": "The answer is 6."}]}
    long = {**short, "rejected": [{"role": "assistant", "content": "2 + 3 = 5. " * 20 + "The answer is 5."}]}
    limit = len(chat_ids(tok, q + short["chosen"])) + 5
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        assert fitting_pairs(tok, [short, long, short], limit, "held-out") == [short, short]
        assert fitting_pairs(tok, [short], limit, "held-out") == [short]
    finally:
        logger.remove(sink)
    assert len(messages) == 1 and "1 of 3 held-out pairs are longer than --max_length" in messages[0]


def test_reward_stage_with_every_pair_too_long_names_the_flag(rl_models, tmp_path):
    from trainer.lib.stages import StageError
    from trainer.train_5_reward import main

    with pytest.raises(StageError, match="every preference pair is longer than --max_length=8"):
        main(["--out_dir", str(tmp_path), "--init_from", str(rl_models["policy"]),
              "--data", str(rl_models["dpo_train"]), "--eval_data", str(rl_models["dpo_eval"]), "--max_length", "8"])


def test_rl_evaluation_tasks(rl_models, tmp_path, capsys):
    """scripts/evaluate.py's RL tasks: math_acc (a policy on RL prompts), rm_acc (the reward model
    on pairs, the same count as reward_model_accuracy), rm_score (a policy's greedy answers scored
    by --reward_model)."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import load_script

    script = load_script("evaluate")
    common = ["--out_dir", str(tmp_path), "--limit", "4", "--max_new_tokens", "6"]

    got = script.main(["--stage", str(rl_models["policy"]), "--task", "math_acc", "--data", str(rl_models["rl_eval"]), *common])
    assert got["n"] == 4 and got["math_acc"] == 0.0  # an untrained model
    got = script.main(["--stage", str(rl_models["reward"]), "--task", "rm_acc", "--data", str(rl_models["dpo_eval"]), *common])
    from dataset.jsonl import load_records

    rm = AutoModelForSequenceClassification.from_pretrained(rl_models["reward"])
    pairs = load_records(rl_models["dpo_eval"], "dpo", limit=4)
    assert got["rm_acc"] == pytest.approx(reward_model_accuracy(rm, AutoTokenizer.from_pretrained(rl_models["reward"]), pairs))
    got = script.main(["--stage", str(rl_models["policy"]), "--task", "rm_score", "--data", str(rl_models["rl_eval"]),
                       "--reward_model", str(rl_models["reward"]), *common])
    assert got["n"] == 4 and isinstance(got["rm_score"], float)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["task"] for line in lines] == ["math_acc", "rm_acc", "rm_score"]
