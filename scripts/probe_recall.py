"""Can a model this size learn to look a fact up in its context within the demo's budget? A probe.

Trains a fresh model from a preset with a plain AdamW loop (cosine schedule, 5% warmup) on one text
mix, and every --every steps prints, on held-out demo questions of the "copy" skill, how often the
answer word is the model's top next token (teacher-forced, by question type), plus the share of
repeated words it gets right in a word list said twice (forward induction):

    colour  "Ben has a yellow cup and Amy has a pink pen. What colour is Ben's cup? Ben's cup is" -> yellow
    who     "... Who has the pink pen?" -> Amy
    where   "Tom went to the park and Ben went to the zoo. Where did Ben go? Ben went to the" -> zoo

Mixes: `pretrain` (the demo's pretraining corpus), `qa` (only such questions with their worked
answers), `drill` (`dataset.demo.recall_drills`: every fact of a story asked both ways), `repeat`
(random word lists said twice). Documents are packed into --max_length blocks, each attending only
to itself (position_ids restart at every <|im_end|>).

    python scripts/probe_recall.py --mix qa --steps 250 --lr 1e-3
    python scripts/probe_recall.py --mix repeat --steps 150 --lr 1e-3 --every 25

Reading it: picking one of the 2-3 colours (names, places) of the context at random scores about
0.45; only above that has the model learned *which* fact the question asks about.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoTokenizer

import model as mm
from dataset import demo
from trainer.lib.runtime import run_main, setup_logging
from trainer.lib.stages import StageError, resolve_init

MIXES = ("pretrain", "qa", "drill", "repeat")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", choices=MIXES, default="qa", help="what the model is trained on")
    p.add_argument("--out_dir", type=Path, default=Path("training"), help="where stage 0 left training/tokenizer")
    p.add_argument("--tokenizer", default=None, help="a tokenizer dir (default: <out_dir>/tokenizer)")
    p.add_argument("--preset", default="tiny", help="model size preset")
    p.add_argument("--heads", type=int, default=None, help="override the preset's attention heads (and kv heads)")
    p.add_argument("--docs", type=int, default=14000, help="documents in the training mix")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50, help="probe every N steps")
    p.add_argument("--probe", type=int, default=300, help="held-out questions probed")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (2x on CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def repeated_lists(n: int, seed: int) -> list[str]:
    """Word lists said twice: the second half is predictable only by copying the first."""
    rng, words = random.Random(f"repeat-{seed}"), demo.NAMES + demo.COLOURS + demo.OBJECTS
    lists = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n)]
    return [f"{s}. Again: {s}." for s in lists]


def training_texts(mix: str, n: int, seed: int) -> list[str]:
    if mix == "pretrain":
        return demo.pretrain_texts(n // 2, "train", seed)
    if mix == "qa":
        return [f"{q} {a}" for q, a, _ in demo.recall_questions(n, "train", seed)]
    if mix == "drill":
        return demo.recall_drills(n // 2, "train", seed)
    return repeated_lists(n, seed)


def packed_blocks(texts: Sequence[str], tokenizer, max_length: int) -> torch.Tensor:
    """[N, max_length] token ids: every text followed by <|im_end|>, joined, cut into blocks."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // max_length
    return torch.tensor(ids[: n * max_length]).view(n, max_length)


def document_positions(blocks: torch.Tensor, eos: int) -> torch.Tensor:
    """Positions that restart at 0 after every eos, so the model keeps packed documents apart."""
    start = torch.zeros_like(blocks, dtype=torch.bool)
    start[:, 0], start[:, 1:] = True, blocks[:, :-1] == eos
    idx = torch.arange(blocks.shape[1]).expand_as(blocks)
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values


def lookup_items(tokenizer, n: int) -> list[tuple[list[int], int, str]]:
    """(prefix ids, answer token id, kind): the prefix ends right before the answer word."""
    items = []
    for question, worked, answer in demo.recall_questions(n, "eval", seed=1):
        word = answer.split()[-1]
        prefix = tokenizer((question + " " + worked[: worked.index(word)]).rstrip())["input_ids"]
        full = tokenizer(question + " " + worked)["input_ids"]
        at = len(prefix)
        while not tokenizer.decode(full[at : at + 1]).strip():  # a small vocabulary may split " red" as " ", "red"
            at += 1
        kind = "colour" if "What colour" in question else "who" if "Who has" in question else "where"
        items.append((full[:at], full[at], kind))
    return items


@torch.no_grad()
def lookup_accuracy(lm, items) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for prefix, target, kind in items:
        top = int(lm(torch.tensor([prefix])).logits[0, -1].argmax())
        hits.setdefault(kind, []).append(top == target)
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(map(sum, hits.values())) / sum(map(len, hits.values()))
    return out


@torch.no_grad()
def repeat_accuracy(lm, tokenizer, texts: Sequence[str]) -> float:
    right = total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        start = len(tokenizer(text.split(" Again:")[0] + " Again:")["input_ids"])
        pred = lm(torch.tensor([ids])).logits[0, start:-2].argmax(-1)
        right += int((pred == torch.tensor(ids[start + 1:-1])).sum())
        total += len(ids) - start - 2
    return right / total


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    setup_logging()
    for name in ("docs", "steps", "batch_size", "max_length", "every", "probe"):
        if getattr(args, name) < 1:
            raise StageError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise StageError(f"--tokenizer {args.tokenizer}: no tokenizer.json there "
                         "(create one with: python trainer/train_0_tokenizer.py)")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_init("pretrain", args.out_dir, None))
    blocks = packed_blocks(training_texts(args.mix, args.docs, args.seed), tokenizer, args.max_length)
    heads = {} if args.heads is None else dict(num_attention_heads=args.heads, num_key_value_heads=args.heads)
    config = mm.config_from_preset(args.preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **heads)
    if args.heads is not None:
        config.head_dim = config.hidden_size // args.heads
    lm = mm.MiniMindForCausalLM(config)
    logger.info(f"mix {args.mix}: {blocks.numel():,} tokens in {len(blocks)} blocks; {mm.format_parameters(lm)}")

    # Decay only matrices (as the stages' Trainer does: not norms, not biases).
    params = [{"params": [p for p in lm.parameters() if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in lm.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=args.lr)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    items, lists = lookup_items(tokenizer, args.probe), repeated_lists(100, seed=10_000)
    gen = torch.Generator().manual_seed(args.seed)
    history, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        batch = blocks[torch.randint(0, len(blocks), (args.batch_size,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = lm(input_ids=batch, labels=batch,
                      position_ids=document_positions(batch, tokenizer.eos_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % args.every == 0 or step == args.steps:
            lm.eval()
            row = {"step": step, "loss": loss.item(), **lookup_accuracy(lm, items),
                   "repeat": repeat_accuracy(lm, tokenizer, lists)}
            lm.train()
            history.append(row)
            logger.info(f"step {step} ({time.time() - t0:.0f} s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k != "step"))
    return history


if __name__ == "__main__":
    run_main(main)
