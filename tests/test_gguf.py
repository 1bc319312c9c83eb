"""GGUF export (scripts/convert_model.py gguf): llama.cpp tokenises and predicts exactly as we do.

The tokenizer checks and the CLI's errors run everywhere. The conversion needs llama.cpp's converter
(a llama-cpp-python source tree, named by $LLAMA_CPP_DIR); the comparisons also need llama-cpp-python
installed. Each skips cleanly without them (README: "GGUF and ollama" says how to get both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dataset.demo import pretrain_texts, sft_conversations
from model import MiniMindConfig, MiniMindForCausalLM
from model.convert_gguf import tokenizer_mismatch

from conftest import load_script

convert_model = load_script("convert_model")

# Text that exercises every branch of the split rule: contractions in any case, a word glued to
# punctuation, digit runs, runs of spaces / tabs / newlines / CRLF, non-Latin scripts, emoji,
# and bytes our tiny vocabulary never merged.
HARD_TEXT = [
    "I've 12 cats; THEY'RE 3.5 kg... (really)!\n\n  ok \r\n\tTab\t\tend   ",
    "Zoë paid 12,50 € — naïve café ☕ 你好，世界！ Привет 🦙🦙 ٣٤٥",
    "a\n\n\n b  \n   c    d'LL e'm f's",
]


def llama_cpp_dir() -> Path:
    env = os.environ.get("LLAMA_CPP_DIR")
    if not env or not (Path(env) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter not found: set LLAMA_CPP_DIR to a llama.cpp source tree")
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece")
    return Path(env)


def course_model(tokenizer, path: Path, seed: int = 0) -> MiniMindForCausalLM:
    """A ~0.1M-param model on the course tokenizer, weights large enough (std 0.15) that greedy choices
    are clear-cut and any mismatch shows; saved with the tokenizer, as a stage saves a checkpoint."""
    torch.manual_seed(seed)
    config = MiniMindConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=None)
    m = MiniMindForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    m.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return m


def test_course_tokenizer_splits_as_qwen2(rl_models, tmp_path):
    """Stage 0's tokenizer passes the check the export relies on; the check rejects what llama.cpp's
    `qwen2` would tokenise differently (GPT-2's split, a normaliser)."""
    assert tokenizer_mismatch(rl_models["policy"]) is None
    spec = json.loads((rl_models["policy"] / "tokenizer.json").read_text())
    gpt2 = {**spec, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True}}
    nfc = {**spec, "normalizer": {"type": "NFC"}}
    for name, bad, expected in (("gpt2", gpt2, "not Qwen2's split rule"), ("nfc", nfc, "normalises")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(bad))
        assert expected in tokenizer_mismatch(tmp_path / name), name
    assert "no tokenizer.json" in tokenizer_mismatch(tmp_path)


def test_gguf_cli_errors(rl_models, tmp_path, capsys, monkeypatch):
    """Exit 2 with one actionable line, and nothing written: no converter (says how to get it), a
    name without .gguf, an existing output, a tokenizer llama.cpp would split differently."""
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    src = rl_models["policy"]
    fake = tmp_path / "llama.cpp"
    (fake / "gguf-py").mkdir(parents=True)
    (fake / "convert_hf_to_gguf.py").write_text("raise SystemExit('must not run')\n")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    for f in src.iterdir():
        (gpt2 / f.name).write_bytes(f.read_bytes())
    spec = json.loads((gpt2 / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (gpt2 / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    cases = {
        "no converter": ([str(src), str(tmp_path / "a.gguf")], "pip download llama-cpp-python"),
        "not a llama.cpp tree": ([str(src), str(tmp_path / "a.gguf"), "--llama_cpp", str(tmp_path)],
                                 "not a llama.cpp source directory"),
        "suffix": ([str(src), str(tmp_path / "a.bin"), "--llama_cpp", str(fake)], "must end in .gguf"),
        "exists": ([str(src), str(tmp_path / "exists.gguf"), "--llama_cpp", str(fake)], "--overwrite"),
        "gpt2 split": ([str(gpt2), str(tmp_path / "a.gguf"), "--llama_cpp", str(fake)], "not Qwen2's split rule"),
        "no model": ([str(tmp_path / "missing"), str(tmp_path / "a.gguf"), "--llama_cpp", str(fake)],
                     "no config.json"),
    }
    for name, (args, expected) in cases.items():
        capsys.readouterr()
        assert convert_model.main(["gguf", *args]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("convert_model.py gguf: error:") and err.count("\n") == 1, (name, err)
        assert expected in err, (name, err)
    assert not (tmp_path / "a.gguf").exists() and (tmp_path / "exists.gguf").read_bytes() == b"keep me"


def real_texts(shared: Path | None, n: int = 40) -> list[str]:
    """A few records of each real dataset beside the repo (English stories, chat, Chinese pairs)."""
    if shared is None:
        return []
    texts = []
    for name, field in (("pretrain_tinystories.jsonl", "text"), ("pretrain_wiki_demo.jsonl", "text"),
                        ("sft_alpaca_en_demo.jsonl", "conversations"), ("sft_alpaca_zh_demo.jsonl", "conversations"),
                        ("dpo_llamafactory_zh.jsonl", "chosen")):
        path = shared / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line, _ in zip(f, range(n)):
                value = json.loads(line)[field]
                texts += [value] if isinstance(value, str) else [m["content"] for m in value]
    return texts


def demo_texts() -> list[str]:
    return pretrain_texts(60, "eval") + [m["content"] for r in sft_conversations(20, "eval") for m in r["conversations"]]


@pytest.fixture(scope="module")
def shared_texts(request) -> list[str]:
    try:
        return real_texts(request.getfixturevalue("data_shared_dir"))
    except pytest.skip.Exception:
        return []


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory, shared_texts):
    """(our model, its tokenizer, the f32 GGUF file llama.cpp's converter wrote from it). The tokenizer
    is stage 0's, trained with a budget large enough for merges that only Qwen2's split allows
    ("!\n", " (", "'ve"): a small vocabulary would tokenise alike under several split rules."""
    from trainer.train_0_tokenizer import build_tokenizer

    converter = llama_cpp_dir()
    root = tmp_path_factory.mktemp("gguf")
    corpus = pretrain_texts(400, "train") + HARD_TEXT * 20 + shared_texts
    tokenizer = build_tokenizer(iter(corpus), vocab_size=1500, min_frequency=2)
    ours = course_model(tokenizer, root / "ckpt")
    out = root / "model.gguf"
    assert convert_model.main(["gguf", str(root / "ckpt"), str(out), "--outtype", "f32",
                               "--llama_cpp", str(converter)]) == 0
    return ours, tokenizer, out


def test_gguf_metadata(gguf_pair):
    """What llama.cpp reads: the qwen3 architecture, the `qwen2` split, our vocabulary in order, our
    end-of-turn token, the chat template; an ollama Modelfile beside it, and no temporary file."""
    import subprocess
    import sys

    ours, tokenizer, out = gguf_pair
    # Read with the converter's own gguf-py, in a child process (its path never enters ours).
    read = ("import json, sys, gguf; f = gguf.GGUFReader(sys.argv[1]).fields; "
            "print(json.dumps({k: v.contents() for k, v in f.items() if k != 'tokenizer.ggml.merges'}))")
    done = subprocess.run([sys.executable, "-c", read, str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(llama_cpp_dir() / "gguf-py")})
    assert done.returncode == 0, done.stderr[-2000:]
    value = json.loads(done.stdout.strip().splitlines()[-1])
    assert value["general.architecture"] == "qwen3" and value["tokenizer.ggml.pre"] == "qwen2"
    assert value["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert value["tokenizer.chat_template"] == tokenizer.chat_template
    assert value["qwen3.block_count"] == ours.config.num_hidden_layers
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt", "model.Modelfile", "model.gguf"]
    recipe = (out.parent / "model.Modelfile").read_text()
    assert recipe.startswith("FROM ./model.gguf\n") and "PARAMETER stop <|im_end|>" in recipe


@pytest.fixture(scope="module")
def llama(gguf_pair):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(model_path=str(gguf_pair[2]), n_ctx=256, n_threads=1, logits_all=True, verbose=False,
                           type_k=0, type_v=0)  # GGML_TYPE_F32: the default f16 KV cache rounds at 1e-3


def test_llama_cpp_tokenises_as_we_do(gguf_pair, llama, shared_texts):
    """Token for token, on held-out demo text, on text built to hit every branch of the split, and on
    the real datasets (English, Chinese) where they are present; then ids -> text back."""
    tokenizer = gguf_pair[1]
    texts = demo_texts() + HARD_TEXT + [t + "\n" + t.upper() for t in HARD_TEXT] + shared_texts
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert theirs == ours, text[:80]
        assert llama.detokenize(theirs).decode("utf-8") == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who has the yellow cup?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert llama.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)


def test_llama_cpp_predicts_as_we_do(gguf_pair, llama):
    """Same logits at every prompt position (f32 file, <= 1e-3) and the same greedy reply (up to 16
    tokens or the end-of-turn token) for four chat prompts."""
    ours, tokenizer, _ = gguf_pair
    for question in ("What is 2 + 3?", "Ben has a yellow cup and Amy has a pink pen. Who has the yellow cup?",
                     "Tell me a story.", "你好"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        if not isinstance(prompt, list):
            prompt = prompt["input_ids"]
        with torch.no_grad():
            logits = ours(torch.tensor([prompt])).logits[0]
            expected = ours.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        llama.reset()
        llama.eval(prompt)
        theirs = torch.tensor(llama.scores[: len(prompt)])
        torch.testing.assert_close(theirs, logits, atol=1e-3, rtol=1e-3)
        got = []
        for token in llama.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == 16 or token == tokenizer.eos_token_id:
                break
        assert got == expected, question
