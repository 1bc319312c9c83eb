"""SFT: which tokens are learned (checked token by token against the rendered template), truncation,
packing without cross-talk, a real stage run, LoRA/QLoRA adapters and the missing-parent message."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as mm  # noqa: F401
from trainer.lib.flags import parse_args
from trainer.lib.lora import build_model
from trainer.lib.runtime import start_stage
from trainer.lib.stages import StageError, latest_checkpoint
from trainer.train_2_sft import SFTArgs, build_trainer, count_truncated, main

SINGLE = [{"role": "user", "content": "What is 2 + 3?"},
          {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]
MULTI = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Tom has a red ball. What colour is Tom's ball?"},
         {"role": "assistant", "content": "Tom's ball is red. The answer is red."},
         {"role": "user", "content": "And 4 + 4?"},
         {"role": "assistant", "content": "4 + 4 = 8. The answer is 8."}]
ASSISTANT = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def small_args(out_dir, *extra: str) -> list[str]:
    data = out_dir / "small_data"
    return ["--out_dir", str(out_dir), "--data", str(data / "sft_train.jsonl"), "--eval_data",
            str(data / "sft_eval.jsonl"), "--max_steps", "3", "--batch_size", "4", "--eval_steps", "2",
            "--logging_steps", "1", "--eval_answers", "4", "--max_new_tokens", "8", *extra]


def trainer_for(out_dir, conversations, *flags: str):
    args = parse_args(SFTArgs, ["--out_dir", str(out_dir), *flags])
    run = start_stage("sft", args)
    init = out_dir / "pretrain" / "checkpoint-1"
    tokenizer = AutoTokenizer.from_pretrained(init)
    data = Dataset.from_list([{"messages": c} for c in conversations])
    return build_trainer(args, run, build_model(args, init, run), tokenizer, data, data), tokenizer


def expected_labels(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation, and labels: the id inside an assistant reply (content and its
    <|im_end|>), -100 everywhere else, derived from character offsets in the rendered text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [m.span(1) for m in ASSISTANT.finditer(text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [i if any(a <= s and e <= b for a, b in spans) else -100
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_only_assistant_replies_and_their_im_end_are_learned(stage_copy, messages):
    trainer, tok = trainer_for(stage_copy, [messages])
    row = trainer.train_dataset[0]
    ids, labels = expected_labels(tok, messages)
    assert row["input_ids"] == ids
    assert row["labels"] == labels

    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    n_replies = sum(m["role"] == "assistant" for m in messages)
    ends = [i for i, t in enumerate(ids) if t == im_end]
    trained_ends = [i for i in ends if labels[i] == im_end]
    assert len(trained_ends) == n_replies  # every reply's <|im_end|> is learned (the model learns to stop)
    assert len(ends) == len(messages)      # ... and no system/user <|im_end|> is
    for i in trained_ends:
        assert tok.decode([ids[i + 1]]) == "\n" and labels[i + 1] == -100       # the newline after it is not
        if i + 2 < len(ids):
            assert ids[i + 2] == im_start and labels[i + 2] == -100             # nor the next header
    first = next(i for i, v in enumerate(labels) if v != -100)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")          # the header is context
    reply = tok.decode([t for t, v in zip(ids, labels) if v != -100])
    assert reply == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")

    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["labels"][0].tolist() == labels


def test_truncation_keeps_the_start_and_is_counted(stage_copy):
    long = SINGLE + [{"role": "user", "content": "And again? " * 30},
                     {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]
    trainer, tok = trainer_for(stage_copy, [SINGLE, long], "--max_length", "48")
    full = tok.apply_chat_template(long, tokenize=True, return_dict=True)["input_ids"]
    assert len(full) > 48
    assert trainer.train_dataset[1]["input_ids"] == full[:48]
    assert count_truncated(tok, Dataset.from_list([{"messages": SINGLE}, {"messages": long}]), 48) == (1, len(full))


def test_packed_conversations_do_not_attend_to_each_other(stage_copy):
    convs = [SINGLE, MULTI, [{"role": "user", "content": "What is 7 - 2?"},
                             {"role": "assistant", "content": "7 - 2 = 5. The answer is 5."}]]
    trainer, tok = trainer_for(stage_copy, convs, "--packing", "--max_length", "256", "--batch_size", "1")
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # padding-free: documents are told apart by position_ids only
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    assert len(starts) - 1 == len(convs)

    lm = trainer.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():  # large random weights: any leak between documents would show
            p.normal_(0, 0.3)
        ids = batch["input_ids"]
        packed = lm(input_ids=ids, position_ids=batch["position_ids"]).logits[0]
        leaky = lm(input_ids=ids).logits[0]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = lm(input_ids=ids[:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(leaky[starts[1]:starts[2]], packed[starts[1]:starts[2]], atol=1e-3)
    # the first token of each packed document never serves as the target of the previous one
    assert all(batch["labels"][0, s] == -100 for s in starts[:-1])


def test_sft_stage_writes_a_loadable_checkpoint_and_tensorboard_events(stage_copy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = main(small_args(stage_copy))
    ckpt = latest_checkpoint(stage_copy / "sft")
    assert ckpt is not None and ckpt.name == "checkpoint-3"
    lm = AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.equal(lm.lm_head.weight, trainer.model.lm_head.weight.cpu())
    AutoTokenizer.from_pretrained(ckpt).apply_chat_template(SINGLE, tokenize=False)
    runs = [p for p in (stage_copy / "sft" / "runs").rglob("events.out.tfevents.*")]
    assert runs
    tags = set()
    for r in runs:
        acc = EventAccumulator(str(r.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/perplexity", "eval/answer_accuracy"} <= tags
    assert any("eval_answer_accuracy" in h for h in trainer.state.log_history)


def test_lora_saves_an_adapter_and_a_merged_model_with_the_same_logits(stage_copy):
    from peft import PeftModel

    main(small_args(stage_copy, "--lora", "--lr", "1e-2", "--lora_targets", "q_proj,v_proj,down_proj"))
    sft = stage_copy / "sft"
    ckpt = latest_checkpoint(sft)
    assert not (ckpt / "adapter_config.json").exists() and (sft / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    base = AutoModelForCausalLM.from_pretrained(stage_copy / "pretrain" / "checkpoint-1").eval()
    base_logits = None
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
        wrapped = PeftModel.from_pretrained(base, sft / "adapter").eval()
        torch.testing.assert_close(merged(ids).logits, wrapped(ids).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)  # the adapter learned something


def test_qlora_runs_on_cpu_and_gradients_survive_generate(stage_copy):
    pytest.importorskip("bitsandbytes")
    args = parse_args(SFTArgs, ["--out_dir", str(stage_copy), "--qlora", "--lora_r", "4"])
    run = start_stage("sft", args)
    lm = build_model(args, stage_copy / "pretrain" / "checkpoint-1", run)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    lm.eval()
    lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)  # a no-grad pass
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), "LoRA gradients vanished after generate()"
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)

    main(small_args(stage_copy, "--qlora", "--max_steps", "2"))
    merged = AutoModelForCausalLM.from_pretrained(latest_checkpoint(stage_copy / "sft"))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # a plain full-precision model


def test_missing_pretrain_checkpoint_names_the_command(tmp_path):
    with pytest.raises(StageError, match=r"python trainer/train_1_pretrain\.py"):
        main(["--out_dir", str(tmp_path)])
