"""Stage 0: train a byte-level BPE tokenizer and give it the chat format.

Byte-level: every string maps to UTF-8 bytes first, so nothing is ever "unknown". BPE then merges
the most frequent adjacent pairs until the vocabulary is full (6400 as in MiniMind: small enough
that the embedding table does not dominate a tiny model). Before merging, text is split with Qwen2's
rule (dataset/pre_tokenizer.py): digits one per token, so "68" is "6" "8" and arithmetic can be learned
digit by digit instead of memorised; and llama.cpp knows the rule, so a GGUF export tokenises the same.

    python trainer/train_0_tokenizer.py                 # demo data -> training/tokenizer/
    python trainer/train_0_tokenizer.py --data dataset/pretrain_t2t_mini.jsonl --vocab_size 6400
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from loguru import logger
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset.chat_template import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE, SPECIAL_TOKENS
from dataset.demo import tokenizer_corpus
from dataset.pre_tokenizer import qwen2_pre_tokenizer
from dataset.jsonl import iter_records
from trainer.lib.data import held_out_count, resolve_data
from trainer.lib.flags import DataFlags, RunFlags, flag, parse_args
from trainer.lib.report import StageReport
from trainer.lib.runtime import run_main, start_stage
from trainer.lib.stages import StageError


@dataclass
class TokenizerArgs(RunFlags, DataFlags):
    vocab_size: int = flag(6400, "vocabulary size, special tokens included")
    min_frequency: int = flag(2, "a pair must occur this often to be merged")
    max_texts: int = flag(2_000_000, "read at most this many training texts")
    max_eval_texts: int = flag(2000, "held-out texts used for the compression / round-trip report")


def count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def texts_of(path: Path, skip_bad_lines: bool, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Plain text from records start..stop of a file: pretraining records, or every message of chat records."""
    with open(path, "rb") as f:
        first = f.readline()
    kind = "chat" if b'"conversations"' in first else "pretrain"
    for rec in islice(iter_records(path, kind, skip_bad_lines=skip_bad_lines), start, stop):
        if kind == "pretrain":
            yield rec["text"]
        else:
            yield from (m["content"] for m in rec["messages"] if m.get("content"))


def build_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer)
    # <|im_end|> ends an assistant turn and separates pretraining documents: one stop token for both.
    # `image_token` names the VLM placeholder for transformers' processors (LlavaProcessor reads it).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE, model_max_length=32768, clean_up_tokenization_spaces=False,
    )


def compression_report(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, float]:
    """Bytes per token on held-out text, and an exact encode -> decode round trip of every line."""
    n_bytes = n_tokens = 0
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)
        back = tokenizer.decode(ids)
        if back != text:
            raise StageError(f"held-out text {i} does not round-trip: {text[:60]!r} -> {back[:60]!r}")
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    return {"bytes_per_token": n_bytes / max(n_tokens, 1), "eval_texts": len(texts), "eval_tokens": n_tokens}


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(TokenizerArgs, argv, __doc__)
    run = start_stage("tokenizer", args)
    data = resolve_data(args, "pretrain")

    if data.demo:
        train_texts = tokenizer_corpus(run.out_dir / "demo_data")
    elif data.eval is not None:
        train_texts = texts_of(data.train, args.skip_bad_lines)
    else:  # no held-out file: the tail of the training file is held out, and never trained on
        n_records = count_records(data.train)
        n_train = n_records - held_out_count(n_records, args.max_eval_texts)
        train_texts = texts_of(data.train, args.skip_bad_lines, stop=n_train)
    seen = [0]  # texts the trainer read, for the report card

    def counted(texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            seen[0] += 1
            yield text

    tokenizer = build_tokenizer(counted(islice(train_texts, args.max_texts)), args.vocab_size, args.min_frequency)
    logger.info(f"trained a vocabulary of {len(tokenizer)} tokens (asked for {args.vocab_size})")

    if data.eval is not None:
        eval_texts = list(islice(texts_of(data.eval, args.skip_bad_lines), args.max_eval_texts))
    else:
        eval_texts = list(islice(texts_of(data.train, args.skip_bad_lines, start=n_train), args.max_eval_texts))
    result = compression_report(tokenizer, eval_texts)
    logger.info(f"held-out: {result['bytes_per_token']:.2f} bytes/token over {result['eval_texts']} texts, "
                f"every one round-trips exactly")
    report = StageReport(run)  # before: raw UTF-8 bytes, one byte per token
    report.before("bytes_per_token", 1.0, higher_is_better=True)
    report.after("bytes_per_token", result["bytes_per_token"])
    report.save(step=0, samples=seen[0])

    out = run.dir
    tokenizer.save_pretrained(out)
    AutoTokenizer.from_pretrained(out)  # fail here, not three stages later, if it does not load
    logger.info(f"saved to {out}; next: python trainer/train_1_pretrain.py")
    return out


if __name__ == "__main__":
    run_main(main)
