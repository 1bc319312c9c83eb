"""scripts/test_chat.py, scripts/inspect_data.py, scripts/bench_data.py and scripts/probe_recall.py, run
in-process on tiny artifacts."""

import json
import re
import shutil

import pytest
import torch

from conftest import load_script
from trainer.lib.generation import Sampling, prompt_ids
from trainer.lib.stages import StageError

pytestmark = pytest.mark.usefixtures("plumb_single_thread")


test_chat = load_script("test_chat")
inspect_data = load_script("inspect_data")
bench_data = load_script("bench_data")
probe_recall = load_script("probe_recall")


@pytest.fixture
def plumb_chat_out(plumb_pretrain, tmp_path):
    """An out_dir with a pretrain checkpoint and the same weights posing as an sft checkpoint (the
    tokenizer saved with it carries the chat template)."""
    out, _ = plumb_pretrain
    shutil.copytree(out / "pretrain" / "checkpoint-8", tmp_path / "pretrain" / "checkpoint-8")
    shutil.copytree(out / "pretrain" / "checkpoint-8", tmp_path / "sft" / "checkpoint-3")
    return tmp_path


def test_chat_pretrain_prompt_continues_text(plumb_chat_out, capsys):
    turns = test_chat.main(["--stage", "pretrain", "--out_dir", str(plumb_chat_out), "--prompt", "Tom has a",
                            "--max_new_tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out
    assert len(turns) == 1 and turns[0][0] == "Tom has a"
    assert "plain continuation" in out and f"model: Tom has a{turns[0][1]}\n" in out


def test_chat_multi_turn_keeps_history(plumb_chat_out, capsys):
    turns = test_chat.main(["--stage", "sft", "--out_dir", str(plumb_chat_out), "--prompt", "What is 2 + 3?",
                            "--prompt", "And 4 + 4?", "--max_new_tokens", "5", "--seed", "0", "--system", "Be brief."])
    out = capsys.readouterr().out
    assert [t[0] for t in turns] == ["What is 2 + 3?", "And 4 + 4?"]
    assert "sft/checkpoint-3: chat" in out and out.count("assistant: ") == 2
    for _, reply in turns:
        assert f"assistant: {reply}\n" in out

    model, tok, _ = test_chat.load(plumb_chat_out / "sft" / "checkpoint-3", "cpu")
    chat = test_chat.Chat(model, tok, chat=True, system="Be brief.", sampling=Sampling(), max_new_tokens=3)
    first = chat.turn("What is 2 + 3?", lambda s: None)
    ids = prompt_ids(tok, chat.prompt("And 4 + 4?"))
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": first}, {"role": "user", "content": "And 4 + 4?"}],
        add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == expected  # the second turn sees the whole conversation
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("sample", [False, True])
def test_chat_streamed_text_equals_final_text(plumb_chat_out, sample):
    model, tok, _ = test_chat.load(plumb_chat_out / "sft" / "checkpoint-3", "cpu")
    args = test_chat.build_parser().parse_args(["--temperature", "1.0" if sample else "0", "--max_new_tokens", "24"])
    chat = test_chat.Chat(model, tok, chat=True, system=None, sampling=test_chat.sampling_of(args),
                          max_new_tokens=args.max_new_tokens, min_new_tokens=24)  # no early stop: a long reply
    torch.manual_seed(0)
    pieces: list[str] = []
    reply = chat.turn("Tell me a story.", pieces.append)
    assert reply and len(pieces) >= 1
    assert "".join(pieces) == reply


def test_token_choices_are_the_models_own_probabilities(plumb_chat_out):
    from trainer.lib.generation import generate, pad, token_choices

    model, tok, _ = test_chat.load(plumb_chat_out / "sft" / "checkpoint-3", "cpu")
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    gen = generate(model, tok, [prompt], 8, Sampling(), min_new_tokens=8)
    choices = token_choices(model, tok, gen, k=4)
    assert len(choices) == 8 and "".join(c.text for c in choices) == tok.decode(gen.completion_ids[0])
    # The same numbers transformers' generate reports step by step (raw logits, softmax at T = 1).
    ids, mask = pad([prompt_ids(tok, prompt)], tok.pad_token_id, side="left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    steps = torch.softmax(torch.stack(out.logits, 1)[0].float(), -1)  # [8, V]
    chosen = out.sequences[0, ids.shape[1]:]
    torch.testing.assert_close(torch.tensor([c.prob for c in choices]), steps[torch.arange(8), chosen])
    assert all(c.rank == 0 and c.top[0][0] == c.text for c in choices)  # greedy always takes the top token
    assert all(len(c.top) == 4 and c.top[0][1] >= c.top[-1][1] for c in choices)

    torch.manual_seed(0)  # sampling hot: some tokens are not the most likely, and rank says which
    hot = generate(model, tok, [prompt], 16, Sampling(temperature=3.0), min_new_tokens=16)
    sampled = token_choices(model, tok, hot, k=50)
    assert any(c.rank > 0 for c in sampled)
    for c in sampled:
        assert c.rank == sum(p > c.prob for _, p in c.top) or c.rank >= 50


def test_chat_show_probs_prints_every_token(plumb_chat_out, capsys):
    turns = test_chat.main(["--stage", "sft", "--out_dir", str(plumb_chat_out), "--prompt", "What is 2 + 3?",
                            "--max_new_tokens", "6", "--temperature", "0", "--show_probs", "--top_alternatives", "2"])
    out = capsys.readouterr().out
    assert len(turns) == 1
    assert "token              p     rank  alternatives" in out
    rows = [line for line in out.splitlines() if line.startswith("  '") or line.startswith('  "')]
    summary = re.search(r"(\d+) tokens, (\d+) with p >= 0.9, (\d+) not the most likely", out)
    assert summary and int(summary[1]) == len(rows) >= 1  # one row per generated token
    assert summary[3] == "0"  # greedy: every token was the most likely one


def test_chat_missing_stage_names_the_command(tmp_path):
    with pytest.raises(StageError, match=r"--stage dpo: no checkpoint .* python trainer/train_3_dpo.py"):
        test_chat.main(["--stage", "dpo", "--out_dir", str(tmp_path), "--prompt", "hi"])
    with pytest.raises(StageError, match="neither a stage name"):
        test_chat.main(["--stage", str(tmp_path / "nowhere"), "--prompt", "hi"])


def test_inspect_sft_labels_only_assistant_tokens(plumb_tokenizer_out, plumb_corpus, capsys):
    inspect_data.main(["--stage", "sft", "--data", str(plumb_corpus["chat"]), "--out_dir", str(plumb_tokenizer_out),
                       "-n", "2", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in plumb_corpus["chat"].read_text().splitlines()]
    for line, record in zip(lines, records):
        rows = json.loads(line)["tokens"]
        trained = "".join(r["text"] for r in rows if r["label"] != -100)
        untrained = "".join(r["text"] for r in rows if r["label"] == -100)
        msgs = record["conversations"]
        assert trained == "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
        for m in msgs:
            if m["role"] != "assistant":
                assert m["content"] in untrained  # user/system text: -100
        assert all(r["label"] in (-100, r["id"]) for r in rows)  # a label is the token's own id or -100
        assert any(r["label"] == r["id"] for r in rows)


def test_inspect_pretrain_shows_the_shift(plumb_tokenizer_out, plumb_corpus, capsys):
    samples = inspect_data.main(["--stage", "pretrain", "--data", str(plumb_corpus["pretrain_train"]),
                                 "--out_dir", str(plumb_tokenizer_out), "-n", "2", "--max_length", "16"])
    table = capsys.readouterr().out
    assert len(samples) == 2 and all(len(s["tokens"]) == 16 for s in samples)
    for s in samples:
        rows = s["tokens"]
        assert [r["label"] for r in rows[:-1]] == [r["id"] for r in rows[1:]]  # label of t = token t+1
        assert rows[-1]["label"] == -100
    assert "target (t+1)" in table and "(block ends)" in table


def test_inspect_dpo_and_rl(plumb_tokenizer_out, plumb_corpus, capsys):
    [dpo] = inspect_data.main(["--stage", "dpo", "--data", str(plumb_corpus["dpo"]), "--out_dir",
                               str(plumb_tokenizer_out)])
    parts = [r["part"] for r in dpo["tokens"]]
    assert parts[0] == "prompt" and {"chosen", "rejected"} <= set(parts)
    record = json.loads(plumb_corpus["dpo"].read_text().splitlines()[0])
    chosen = "".join(r["text"] for r in dpo["tokens"] if r["part"] == "chosen")
    assert chosen.startswith(record["chosen"][-1]["content"] + "<|im_end|>")
    assert all(r["label"] == -100 for r in dpo["tokens"] if r["part"] == "prompt")
    [rl] = inspect_data.main(["--stage", "rl", "--data", str(plumb_corpus["rl"]), "--out_dir",
                              str(plumb_tokenizer_out)])
    assert rl["gt"] and "".join(r["text"] for r in rl["tokens"]).endswith("<|im_start|>assistant\n")
    assert "gt: [" in capsys.readouterr().out


def test_bench_data_reports_ratios(plumb_tokenizer_out, plumb_corpus, capsys):
    figures = bench_data.main(["--data", str(plumb_corpus["pretrain_train"]), "--out_dir", str(plumb_tokenizer_out),
                               "--max_texts", "100", "--batch_size", "2", "--max_length", "16",
                               "--loader_batches", "5", "--step_tokens_per_s", "1000", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["loader_over_training"] == figures["loader_over_training"] > 0
    assert figures["tokenizer_tokens_per_s"] > 0 and figures["loader_batches"] == 5
    assert figures["loader_over_training"] == pytest.approx(figures["loader_tokens_per_s"] / 1000)


def test_probe_recall_positions_restart_after_every_document():
    eos = 9
    blocks = torch.tensor([[5, 6, eos, 7, 8, 8, eos, 1], [eos, 2, 3, 4, 4, 4, 4, 4]])
    assert probe_recall.document_positions(blocks, eos).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0],
                                                                     [0, 0, 1, 2, 3, 4, 5, 6]]


def test_probe_recall_asks_for_the_answer_word_and_trains(stage_out_dir, plumb_preset):
    from transformers import AutoTokenizer

    from dataset.demo import recall_questions

    tok_dir = stage_out_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    for (prefix, target, kind), (question, _, answer) in zip(probe_recall.lookup_items(tokenizer, 12),
                                                             recall_questions(12, "eval", seed=1)):
        assert tokenizer.decode(prefix).startswith(question) and kind in {"colour", "who", "where"}
        word = tokenizer.decode([target]).strip()  # the answer word, or its first piece
        assert word and answer.split()[-1].startswith(word)
    history = probe_recall.main(["--tokenizer", str(tok_dir), "--preset", plumb_preset, "--mix", "drill",
                                 "--docs", "60", "--steps", "3", "--every", "2", "--batch_size", "2",
                                 "--max_length", "64", "--probe", "6", "--no-bf16"])
    assert [h["step"] for h in history] == [2, 3]
    for h in history:
        assert all(0.0 <= h[k] <= 1.0 for k in ("all", "repeat")) and h["loss"] > 0


def test_probe_recall_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(StageError, match="--steps 0"):
        probe_recall.main(["--tokenizer", str(tmp_path), "--steps", "0"])
    with pytest.raises(StageError, match="train_0_tokenizer"):
        probe_recall.main(["--tokenizer", str(tmp_path / "nowhere")])
    with pytest.raises(StageError, match="train_0_tokenizer"):  # no --tokenizer and no stage 0 output
        probe_recall.main(["--out_dir", str(tmp_path)])


def test_bench_data_scale_measures_each_phase_in_its_own_process(plumb_tokenizer_out, capsys):
    figures = bench_data.main(["--out_dir", str(plumb_tokenizer_out), "--scale_mb", "0.3"])
    printed = capsys.readouterr().out
    pre, sft, dpo = figures["pretokenize"], figures["sft"], figures["dpo"]
    assert pre["file_mb"] >= 0.3 and pre["records"] > 0 and pre["tokens"] > pre["records"]
    assert sft["records"] > 0 and dpo["records"] > 0
    for phase in (pre, sft, dpo):
        assert phase["peak_rss_mb"] >= phase["base_rss_mb"] > 0 and phase["seconds"] > 0
    assert "pretokenize:" in printed and "sft load" in printed and "tokens/s" in printed
