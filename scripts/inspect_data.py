"""See training data exactly as the model sees it: token by token, with the label each position gets.

    python scripts/inspect_data.py --stage pretrain -n 1 --max_length 48
    python scripts/inspect_data.py --stage sft -n 2                 # -100 = no loss (system/user/template)
    python scripts/inspect_data.py --stage dpo --data dataset/dpo.jsonl
    python scripts/inspect_data.py --stage rl --json | head

Columns: pos (position in the sequence), token (repr of its text), id, label.
- pretrain: documents joined with <|im_end|> and cut into blocks. Hugging Face passes
  labels == input_ids and shifts inside the loss, so position t is trained to predict token t+1:
  the table shows that target explicitly; the last position of a block has none (-100).
- sft: the chat template; labels are the ids of what the assistant writes (its <|im_end|> included)
  and -100 everywhere else, from `apply_chat_template(..., return_assistant_tokens_mask=True)`
  (the template's {% generation %} marks), the same marks trl's `assistant_only_loss` reads.
- dpo: the shared prompt (-100), then the chosen and the rejected reply, each scored after the prompt.
- rl: only the prompt is given; the model writes the rest and `gt` (the verifiable answer) grades it.
The default data is what the stage itself would read (--data, MiniMind's file under dataset/, or the demo).
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

from transformers import AutoTokenizer

from dataset.jsonl import iter_records
from dataset.pretokenize import encode_documents
from trainer.lib.data import resolve_data
from trainer.lib.runtime import run_main, setup_logging
from trainer.lib.stages import resolve_stage_or_path

IGNORE = -100
RECORD_KIND = {"pretrain": "pretrain", "sft": "chat", "dpo": "dpo", "rl": "rl"}
DEFAULT_LENGTH = {"pretrain": 64, "sft": 256, "dpo": 256, "rl": 256}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=tuple(RECORD_KIND), help="which stage's view of the data")
    p.add_argument("--data", default=None, help="jsonl file; default: the file the stage would train on")
    p.add_argument("-n", type=int, default=1, help="samples (pretrain: blocks) to show")
    p.add_argument("--tokenizer", default="tokenizer", help="stage name or dir holding the tokenizer")
    p.add_argument("--max_length", type=int, default=None,
                   help="tokens per sample, longer ones keep their start (default: 64 pretrain block, 256 else)")
    p.add_argument("--out_dir", default="training", help="root of the stages' outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample instead of tables")
    return p


def _row(pos: int, tokenizer, tid: int, label: int, part: str | None = None) -> dict:
    row = {"pos": pos, "token": tokenizer.convert_ids_to_tokens(tid), "text": tokenizer.decode([tid]),
           "id": int(tid), "label": int(label)}
    if part is not None:
        row["part"] = part
    return row


def pretrain_samples(tokenizer, path: Path, n: int, max_length: int) -> Iterator[dict]:
    """The first n packed blocks; label of position t = token t+1 (the shift made explicit)."""
    texts = (r["text"] for r in iter_records(path, "pretrain"))
    stream: list[int] = []
    for ids in encode_documents(texts, tokenizer, batch_size=64):
        stream.extend(ids)
        if len(stream) >= n * max_length:
            break
    for b in range(min(n, len(stream) // max_length)):
        block = stream[b * max_length:(b + 1) * max_length]
        rows = [_row(t, tokenizer, tid, block[t + 1] if t + 1 < len(block) else IGNORE) for t, tid in enumerate(block)]
        yield {"sample": b, "span": [b * max_length, (b + 1) * max_length], "tokens": rows}


def sft_samples(tokenizer, path: Path, n: int, max_length: int) -> Iterator[dict]:
    for i, rec in enumerate(islice(iter_records(path, "chat"), n)):
        enc = tokenizer.apply_chat_template(rec["messages"], tools=rec.get("tools"), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        rows = [_row(t, tokenizer, tid, tid if m else IGNORE) for t, (tid, m) in enumerate(zip(ids, mask))]
        yield {"sample": i, "length": len(ids), "tokens": rows[:max_length]}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def dpo_samples(tokenizer, path: Path, n: int, max_length: int) -> Iterator[dict]:
    """prompt = the chat-templated shared turns + the assistant header; each reply is the rest of
    the full conversation's text, scored (log-probabilities summed) given that prompt."""
    for i, rec in enumerate(islice(iter_records(path, "dpo"), n)):
        prompt_text = _render(tokenizer, rec["prompt"], True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        rows = [_row(t, tokenizer, tid, IGNORE, "prompt") for t, tid in enumerate(prompt_ids)][:max_length]
        for part in ("chosen", "rejected"):
            full = _render(tokenizer, rec["prompt"] + rec[part], False)
            reply_ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
            room = max(0, max_length - len(prompt_ids))
            rows += [_row(len(prompt_ids) + t, tokenizer, tid, tid, part) for t, tid in enumerate(reply_ids[:room])]
        yield {"sample": i, "tokens": rows}


def rl_samples(tokenizer, path: Path, n: int, max_length: int) -> Iterator[dict]:
    for i, rec in enumerate(islice(iter_records(path, "rl"), n)):
        ids = tokenizer(_render(tokenizer, rec["prompt"], True), add_special_tokens=False)["input_ids"]
        rows = [_row(t, tokenizer, tid, IGNORE, "prompt") for t, tid in enumerate(ids)][:max_length]
        yield {"sample": i, "tokens": rows, "gt": rec["gt"]}


SAMPLERS = {"pretrain": pretrain_samples, "sft": sft_samples, "dpo": dpo_samples, "rl": rl_samples}
NOTES = {
    "pretrain": "labels == input_ids; the loss shifts them: position t learns token t+1 (label column = that target)",
    "sft": "label = the id on assistant tokens (trained), -100 elsewhere (system, user, template headers)",
    "dpo": "prompt: -100; chosen and rejected: log-probabilities summed after the same prompt",
    "rl": "prompt only: the model writes the completion, a reward function compares it with gt",
}


def format_table(stage: str, sample: dict) -> str:
    rows = sample["tokens"]
    trained = sum(r["label"] != IGNORE for r in rows)
    head = f"== {stage} sample {sample['sample']}: {len(rows)} tokens, {trained} with a label"
    if "length" in sample and sample["length"] > len(rows):
        head += f" (first {len(rows)} of {sample['length']})"
    if "span" in sample:
        head += f" (stream tokens {sample['span'][0]}..{sample['span'][1] - 1})"
    lines = [head]
    has_part = any("part" in r for r in rows)
    header = f"{'pos':>5}  " + (f"{'part':<9}" if has_part else "") + f"{'token':<22}{'id':>6}  "
    header += f"{'target (t+1)':<22}{'label':>6}" if stage == "pretrain" else f"{'label':>6}"
    lines.append(header)
    for r in rows:
        line = f"{r['pos']:>5}  " + (f"{r.get('part', ''):<9}" if has_part else "") + f"{r['text']!r:<22}{r['id']:>6}  "
        if stage == "pretrain":
            target = repr(rows[r["pos"] + 1]["text"]) if r["pos"] + 1 < len(rows) else "(block ends)"
            line += f"{target:<22}{r['label']:>6}"
        else:
            line += f"{r['label']:>6}"
        lines.append(line)
    if "gt" in sample:
        lines.append(f"gt: {sample['gt']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    setup_logging()
    out_dir = Path(args.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_stage_or_path(args.tokenizer, out_dir, flag="--tokenizer"))
    data = resolve_data(SimpleNamespace(data=args.data, eval_data=None, out_dir=args.out_dir), args.stage)
    max_length = args.max_length or DEFAULT_LENGTH[args.stage]
    samples = list(SAMPLERS[args.stage](tokenizer, data.train, args.n, max_length))
    if args.json:
        for s in samples:
            print(json.dumps({"stage": args.stage, "data": str(data.train), **s}, ensure_ascii=False))
    else:
        print(f"{data.train}: {NOTES[args.stage]}")
        for s in samples:
            print(format_table(args.stage, s))
    return samples


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `... | head` ends quietly instead of with a BrokenPipeError
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    run_main(main)
