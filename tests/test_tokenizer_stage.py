"""Stage 0 (trainer/train_0_tokenizer.py): a byte-level BPE that round-trips, loads, and chats."""

import json

import pytest
from transformers import AutoTokenizer

from dataset.chat_template import ENDOFTEXT, IM_END, IM_START

pytestmark = pytest.mark.usefixtures("plumb_single_thread")


def test_tokenizer_stage(plumb_tokenizer_out, plumb_corpus):
    tok = AutoTokenizer.from_pretrained(plumb_tokenizer_out / "tokenizer")
    assert len(tok) == 320
    assert (tok.eos_token, tok.pad_token) == (IM_END, ENDOFTEXT)
    assert tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [0, 1, 2]

    held_out = [json.loads(line)["text"] for line in plumb_corpus["pretrain_eval"].read_text().splitlines()]
    held_out += ["Zoë paid 12.50 € — naïve café ☕ 你好", "  two  spaces\tand\na newline"]  # unseen bytes
    for text in held_out:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # digits are split one per token
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    # compression: merges were learned (well below one token per byte on held-out text)
    n_bytes = sum(len(t.encode()) for t in held_out[:-2])
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in held_out[:-2])
    assert n_bytes / n_tokens > 1.3


def test_tokenizer_chat_template(plumb_tokenizer_out):
    tok = AutoTokenizer.from_pretrained(plumb_tokenizer_out / "tokenizer")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "The answer is 5."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\nThe answer is 5.<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # special tokens are single ids, never split into bytes
    ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids.count(tok.eos_token_id) == 2
