"""Is the data pipeline fast enough? Tokenizer and loader throughput against what training consumes.

    python scripts/bench_data.py                                  # demo corpus, training/tokenizer, tiny model
    python scripts/bench_data.py --data dataset/pretrain_t2t_mini.jsonl --preset small
    python scripts/bench_data.py --step_tokens_per_s 30000        # compare with a GPU's measured speed

Three numbers, in tokens per second:
  - tokenizer: batch encoding of the corpus text (also reported in MB/s of UTF-8), what
    `dataset.pretokenize` does once before training;
  - loader: `PackedBlocks` read from the memmap through a shuffling `DataLoader`, what every
    training step does;
  - training: forward + backward + AdamW of a `--preset` model on `--batch_size x --max_length`
    blocks (or `--step_tokens_per_s`, measured elsewhere).
The ratios loader/training and tokenizer/training must be far above 1: then the model, not the
data, sets the pace (a ratio near 1 means the GPU would wait for data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

import model as mm
from dataset.jsonl import iter_records
from dataset.pretokenize import PackedBlocks, TokenMemmap, pretokenize
from trainer.lib.data import resolve_data
from trainer.lib.runtime import pick_precision, run_main, setup_logging
from trainer.lib.stages import StageError, resolve_stage_or_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="pretraining jsonl; default: what the pretrain stage reads")
    p.add_argument("--tokenizer", default="tokenizer", help="stage name or dir holding the tokenizer")
    p.add_argument("--out_dir", default="training", help="root of the stages' outputs")
    p.add_argument("--max_texts", type=int, default=5000, help="documents read for the benchmark")
    p.add_argument("--batch_size", type=int, default=16, help="blocks per step (loader and training)")
    p.add_argument("--max_length", type=int, default=256, help="block length in tokens")
    p.add_argument("--loader_batches", type=int, default=200, help="batches drawn from the DataLoader")
    p.add_argument("--preset", default="tiny", help="model measured for the training side")
    p.add_argument("--train_steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--step_tokens_per_s", type=float, default=None,
                   help="training tokens/s measured elsewhere (skips the training measurement)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    return p


def bench_tokenizer(tokenizer, texts: list[str], batch: int = 1000) -> dict:
    start = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(texts), batch):
        n_tokens += sum(len(ids) for ids in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - start
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    return {"tokenizer_mb_per_s": mb / seconds, "tokenizer_tokens_per_s": n_tokens / seconds,
            "corpus_mb": mb, "corpus_tokens": n_tokens}


def bench_loader(tokens: TokenMemmap, batch_size: int, max_length: int, batches: int) -> dict:
    blocks = PackedBlocks(tokens, max_length)
    if len(blocks) < batch_size:
        raise StageError(f"the corpus holds {len(tokens)} tokens: fewer than one batch of "
                         f"{batch_size} x {max_length}; lower --batch_size/--max_length or add --max_texts")
    loader = torch.utils.data.DataLoader(blocks, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    n = 0
    start = time.perf_counter()
    while n < batches:
        for _ in loader:
            n += 1
            if n >= batches:
                break
    seconds = time.perf_counter() - start
    return {"loader_tokens_per_s": n * batch_size * max_length / seconds, "loader_batches": n}


def bench_training(vocab_size: int, preset: str, batch_size: int, max_length: int, steps: int, device: str) -> dict:
    precision = pick_precision(device)
    config = mm.config_from_preset(preset, vocab_size=vocab_size, max_position_embeddings=max(2048, max_length))
    model = mm.MiniMindForCausalLM(config).to(precision.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (batch_size, max_length), device=precision.device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(precision.device, dtype=precision.dtype, enabled=precision.dtype != torch.float32):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if precision.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: allocations, kernel selection
    seconds = statistics.median(step() for _ in range(steps))
    return {"train_tokens_per_s": batch_size * max_length / seconds, "train_step_s": seconds,
            "train_params_M": mm.count_parameters(model)["total"] / 1e6}


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    out_dir = Path(args.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_stage_or_path(args.tokenizer, out_dir, flag="--tokenizer"))
    data = resolve_data(SimpleNamespace(data=args.data, eval_data=None, out_dir=args.out_dir), "pretrain")
    texts = [r["text"] for _, r in zip(range(args.max_texts), iter_records(data.train, "pretrain"))]

    figures = {"data": str(data.train), "texts": len(texts)}
    figures.update(bench_tokenizer(tokenizer, texts))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = pretokenize(texts, tokenizer, Path(tmp) / "bench")
        figures.update(bench_loader(TokenMemmap(prefix), args.batch_size, args.max_length, args.loader_batches))
    if args.step_tokens_per_s:
        figures["train_tokens_per_s"] = args.step_tokens_per_s
    else:
        figures.update(bench_training(len(tokenizer), args.preset, args.batch_size, args.max_length,
                                      args.train_steps, args.device))
    train = figures["train_tokens_per_s"]
    figures["loader_over_training"] = figures["loader_tokens_per_s"] / train
    figures["tokenizer_over_training"] = figures["tokenizer_tokens_per_s"] / train

    if args.json:
        print(json.dumps(figures))
    else:
        where = ("given (--step_tokens_per_s)" if args.step_tokens_per_s else
                 f"{args.preset} model, {figures['train_params_M']:.2f}M params, step {figures['train_step_s']:.2f} s")
        print(f"data: {data.train} ({len(texts)} texts, {figures['corpus_mb']:.2f} MB, {figures['corpus_tokens']:,} tokens)")
        print(f"tokenizer : {figures['tokenizer_tokens_per_s']:>12,.0f} tokens/s  ({figures['tokenizer_mb_per_s']:.2f} MB/s)")
        print(f"loader    : {figures['loader_tokens_per_s']:>12,.0f} tokens/s  "
              f"(PackedBlocks {args.batch_size} x {args.max_length} from a memmap, {figures['loader_batches']} batches)")
        print(f"training  : {train:>12,.0f} tokens/s  ({where})")
        print(f"ratios    : loader/training {figures['loader_over_training']:,.0f}x, "
              f"tokenizer/training {figures['tokenizer_over_training']:,.0f}x  (must be >> 1)")
    return figures


if __name__ == "__main__":
    run_main(main)
