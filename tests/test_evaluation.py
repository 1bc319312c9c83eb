"""Evaluation: metrics on hand-built cases, a better model scores better, and scripts/evaluate.py
prints one JSON line and explains a missing stage."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as mm  # noqa: F401
from conftest import load_script
from trainer.lib.generation import chat_ids
from trainer.lib.metrics import (accuracy_by_skill, answer_accuracy, answer_items, binomial_stderr, completion_logprobs,
                                 loglik_accuracy, perplexity, preference_accuracy)
from trainer.lib.stages import StageError
from trainer.lib.tasks import TASKS, EvalRequest, register_task, resolve_ref


def evaluate_main(argv):
    return load_script("evaluate").main(argv)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_preference_accuracy_on_a_hand_built_case():
    t = torch.tensor
    # rewards (beta 0.5): chosen [0.5, 0, 0], rejected [0, 1, 0] -> win, loss, tie
    m = preference_accuracy(chosen=t([-1.0, -5.0, -3.0]), rejected=t([-2.0, -1.0, -3.0]),
                            ref_chosen=t([-2.0, -5.0, -3.0]), ref_rejected=t([-2.0, -3.0, -3.0]), beta=0.5)
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["margin"] == pytest.approx((0.5 - 1 + 0) / 3)
    assert m["reward_chosen"] == pytest.approx(0.5 / 3) and m["reward_rejected"] == pytest.approx(1 / 3)
    same = preference_accuracy(t([-1.0, -2.0]), t([-3.0, -1.0]), t([-1.0, -2.0]), t([-3.0, -1.0]))
    assert same["accuracy"] == 0.5 and same["margin"] == 0.0  # a model against itself: chance
    ll = loglik_accuracy(t([-1.0, -5.0, -2.0, -4.0]), t([-2.0, -1.0, -3.0, -4.0]))
    assert ll["accuracy"] == pytest.approx(2.5 / 4) and ll["logp_gap"] == pytest.approx((1 - 4 + 1 + 0) / 4)


def test_accuracy_by_skill_groups_questions_and_stderr_is_binomial():
    ask = [[{"role": "user", "content": q}] for q in (
        "What is 23 + 45?", "What is 12 + 39?", "What is 3 + 4?",
        "Ben has a red cup and Amy has a pink pen. Who has the red cup?")]
    by = accuracy_by_skill(ask, [True, False, True, False])
    assert by == {"arith": {"n": 2, "accuracy": 0.5}, "one_digit_arith": {"n": 1, "accuracy": 1.0},
                  "copy": {"n": 1, "accuracy": 0.0}}
    assert accuracy_by_skill([[{"role": "user", "content": "Tell me a story."}]], [True]) == {}
    assert binomial_stderr(0.3, 200) == pytest.approx(math.sqrt(0.3 * 0.7 / 200))
    assert binomial_stderr(1.0, 50) == 0.0


def test_completion_logprobs_sum_the_reply_tokens_only(stage_out_dir):
    lm, tok = load(stage_out_dir / "pretrain" / "checkpoint-1")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    replies = [[{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}], [{"role": "assistant", "content": "Hello"}]]
    batched = completion_logprobs(lm, tok, prompts, replies, batch_size=2)
    for i in range(2):
        start = len(chat_ids(tok, prompts[i], add_generation_prompt=True))
        ids = torch.tensor([chat_ids(tok, prompts[i] + replies[i])])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
        expected = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
        assert batched[i].item() == pytest.approx(expected, abs=1e-4)
        assert completion_logprobs(lm, tok, prompts[i:i + 1], replies[i:i + 1])[0].item() == pytest.approx(expected, abs=1e-4)


def test_perplexity_is_exp_of_the_models_own_loss(stage_out_dir):
    lm, tok = load(stage_out_dir / "pretrain" / "checkpoint-1")
    text = "Tom has a red ball. He went to the park."
    ids = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]])
    with torch.no_grad():
        loss = lm(ids, labels=ids).loss.item()
    m = perplexity(lm, tok, [text, text + " Mia has a cup."], batch_size=2)
    assert perplexity(lm, tok, [text])["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert m["tokens"] == 2 * ids.shape[1] - 2 + len(tok.encode(" Mia has a cup.", add_special_tokens=False))


def test_a_model_trained_on_the_answers_scores_higher(stage_out_dir):
    """Overfit the untrained tiny model on 4 held-out conversations: its greedy answers to exactly those
    prompts become right, the untrained model's are not; answer_accuracy and loglik see the difference."""
    untrained, tok = load(stage_out_dir / "pretrain" / "checkpoint-1")
    prompts, golds = answer_items(stage_out_dir / "small_data" / "sft_eval.jsonl", limit=4)
    trained, _ = load(stage_out_dir / "pretrain" / "checkpoint-1")
    rows = [chat_ids(tok, p + [{"role": "assistant", "content": f"The answer is {g[0]}."}]) for p, g in zip(prompts, golds)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    opt = torch.optim.Adam(trained.parameters(), lr=2e-2)
    trained.train()
    for _ in range(200):
        loss = trained(ids, labels=labels).loss  # right padding: real tokens never look at it
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    good = answer_accuracy(trained, tok, prompts, golds, max_new_tokens=12)
    bad = answer_accuracy(untrained, tok, prompts, golds, max_new_tokens=12)
    assert good["accuracy"] >= 0.75 > bad["accuracy"]
    assert good["answered"] == 1.0

    replies = [[{"role": "assistant", "content": f"The answer is {g[0]}."}] for g in golds]
    wrong = [[{"role": "assistant", "content": f"The answer is {int(g[0]) + 1 if g[0].isdigit() else 'blue'}."}]
             for g in golds]
    gap = lambda m: loglik_accuracy(completion_logprobs(m, tok, prompts, replies), completion_logprobs(m, tok, prompts, wrong))
    assert gap(trained)["logp_gap"] > gap(untrained)["logp_gap"] + 1.0


def test_answer_items_read_chat_and_rl_files(stage_out_dir):
    from dataset.jsonl import load_records

    data = stage_out_dir / "small_data"
    prompts, golds = answer_items(data / "sft_eval.jsonl", limit=3)
    assert len(prompts) == 3 and all(p[-1]["role"] == "user" for p in prompts)
    assert all(len(g) == 1 and g[0] for g in golds)
    prompts, golds = answer_items(data / "rl_eval.jsonl", limit=None)
    assert golds == [r["gt"] for r in load_records(data / "rl_eval.jsonl", "rl")]


def test_evaluate_script_prints_one_json_line_per_task(stage_copy, capsys):
    data = stage_copy / "small_data"
    files = {"ppl": "pretrain_eval", "answer_acc": "sft_eval", "pref_acc": "dpo_eval", "loglik_acc": "dpo_eval"}
    for task, name in files.items():
        capsys.readouterr()
        evaluate_main(["--stage", "pretrain", "--task", task, "--out_dir", str(stage_copy), "--data",
                       str(data / f"{name}.jsonl"), "--limit", "4", "--ref", "pretrain", "--max_new_tokens", "4"])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert len(lines) == 1
        result = json.loads(lines[0])
        assert result["stage"] == "pretrain" and result["task"] == task and result["n"] == 4
        assert {"ppl": "ppl", "answer_acc": "answer_acc", "pref_acc": "pref_acc", "loglik_acc": "loglik_acc"}[task] in result
    assert result["loglik_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_pref_acc_reference_defaults_to_the_parent_stage(stage_copy):
    shutil.copytree(stage_copy / "pretrain" / "checkpoint-1", stage_copy / "dpo" / "checkpoint-7")
    req = EvalRequest(stage="dpo", model_dir=stage_copy / "dpo" / "checkpoint-7", data=stage_copy, out_dir=stage_copy)
    with pytest.raises(StageError, match=r"python trainer/train_2_sft\.py"):
        resolve_ref(req)
    shutil.copytree(stage_copy / "pretrain" / "checkpoint-1", stage_copy / "sft" / "checkpoint-5")
    assert resolve_ref(req) == stage_copy / "sft" / "checkpoint-5"
    by_path = EvalRequest(stage=str(stage_copy / "dpo" / "checkpoint-7"), model_dir=stage_copy / "dpo" / "checkpoint-7",
                          data=stage_copy, out_dir=stage_copy.parent / "elsewhere")
    assert resolve_ref(by_path) == stage_copy / "sft" / "checkpoint-5"


def test_missing_stage_names_the_command_that_creates_it(tmp_path):
    with pytest.raises(StageError, match=r"--stage pretrain: .*python trainer/train_1_pretrain\.py"):
        evaluate_main(["--stage", "pretrain", "--task", "ppl", "--out_dir", str(tmp_path)])


def test_tasks_registry_can_grow():
    assert {"ppl", "answer_acc", "pref_acc", "loglik_acc"} <= set(TASKS)

    @register_task("constant", "sft_eval", "a test task")
    def constant(req):
        return {"n": 0, "constant": 1.0}

    try:
        assert TASKS["constant"].run is constant and TASKS["constant"].default_data == "sft_eval"
    finally:
        TASKS.pop("constant")
