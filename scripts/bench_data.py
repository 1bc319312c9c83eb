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

    python scripts/bench_data.py --scale_mb 1000                  # MiniMind-sized files, generated

--scale_mb N generates a ~N MB pretraining jsonl (and an N/10 MB SFT and DPO jsonl) from the demo
texts and measures what a run on MiniMind's GB files does once: `pretokenize` the whole file
(tokens/s on all cores, peak RSS, which must stay far below the file's size because the file is
streamed) and load the SFT and DPO files the way those stages do (records/s, peak RSS: the records
are written to Arrow files on disk and memory-mapped, trainer/lib/data.py's disk_dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

import model as mm
from dataset.demo import DemoSizes, write_demo_data
from dataset.jsonl import iter_records
from dataset.pretokenize import PackedBlocks, TokenMemmap, pretokenize
from trainer.lib.data import chat_dataset, pair_dataset, resolve_data
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
    p.add_argument("--scale_mb", type=float, default=None,
                   help="generate a ~N MB pretraining jsonl (and N/10 MB SFT/DPO files) and measure pretokenize "
                        "and loading: throughput and peak RSS")
    p.add_argument("--scale_dir", default=None, help="where --scale_mb writes its files (default: a temporary dir)")
    p.add_argument("--scale_phase", choices=("pretokenize", "sft", "dpo"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--scale_file", default=None, help=argparse.SUPPRESS)  # --scale_mb runs each phase as a child
    return p


def rss_mb(peak: bool = False) -> float:
    """This process's resident memory now, or its peak so far (`ru_maxrss`), in MB (Linux)."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_scaled(source: Path, target: Path, mb: float, join: int, seed: int = 0) -> float:
    """Write ~`mb` MB of jsonl to `target` from `source`'s lines; with `join` > 1 (pretraining text), each
    line is `join` random source documents run together, so lines differ. Returns the size in MB."""
    rng = random.Random(seed)
    lines = source.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines] if join > 1 else lines
    limit = int(mb * 2**20)
    with target.open("w", encoding="utf-8") as f:
        while f.tell() < limit:
            chunk = [json.dumps({"text": " ".join(rng.sample(texts, join))}, ensure_ascii=False) if join > 1
                     else rng.choice(texts) for _ in range(1000)]
            f.write("\n".join(chunk) + "\n")
    return target.stat().st_size / 2**20


def run_phase(phase: str, path: Path, tokenizer) -> dict:
    """One --scale_mb measurement in this (fresh) process: rate, and peak RSS against the RSS before it."""
    base = rss_mb()
    start = time.perf_counter()
    if phase == "pretokenize":
        tokens = TokenMemmap(pretokenize(path, tokenizer, path.with_suffix("")))
        out = {"tokens": len(tokens), "records": len(tokens.offsets) - 1}
    else:
        load = chat_dataset if phase == "sft" else pair_dataset  # as the stages load them: Arrow on disk
        out = {"records": len(load(path, path.parent / f"{phase}_cache"))}
    seconds = time.perf_counter() - start
    return {**out, "seconds": seconds, "base_rss_mb": base, "peak_rss_mb": rss_mb(peak=True)}


def bench_scale(tokenizer_dir: Path, mb: float, root: Path) -> dict:
    """pretokenize a ~`mb` MB pretraining jsonl, load ~`mb`/10 MB of SFT and DPO records, each in its own
    process (so each peak RSS is that phase's alone): `{phase: {records, seconds, base/peak_rss_mb, file_mb}}`."""
    demo = write_demo_data(root / "demo", DemoSizes())
    figures: dict = {"cpu_cores": os.cpu_count()}
    for phase, source, size, join in (("pretokenize", "pretrain_train", mb, 4), ("sft", "sft_train", mb / 10, 1),
                                      ("dpo", "dpo_train", mb / 10, 1)):
        path = root / f"{phase}_scale.jsonl"
        file_mb = write_scaled(demo[source], path, size, join)
        cmd = [sys.executable, __file__, "--tokenizer", str(tokenizer_dir), "--scale_phase", phase,
               "--scale_file", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise StageError(f"the {phase} measurement failed:\n{done.stderr[-2000:]}")
        figures[phase] = {**json.loads(done.stdout.strip().splitlines()[-1]), "file_mb": file_mb}
    return figures


def print_scale(f: dict) -> None:
    p = f["pretokenize"]
    print(f"pretokenize: {p['file_mb']:,.0f} MB jsonl, {p['records']:,} docs, {p['tokens']:,} tokens in "
          f"{p['seconds']:.0f} s = {p['tokens'] / p['seconds']:,.0f} tokens/s ({p['file_mb'] / p['seconds']:.1f} MB/s, "
          f"{f['cpu_cores']} cores); peak RSS {p['peak_rss_mb']:,.0f} MB ({p['base_rss_mb']:,.0f} MB before it)")
    for kind in ("sft", "dpo"):
        k = f[kind]
        print(f"{kind} load   : {k['file_mb']:,.0f} MB jsonl, {k['records']:,} records at {k['records'] / k['seconds']:,.0f}/s; "
              f"peak RSS {k['peak_rss_mb']:,.0f} MB ({k['base_rss_mb']:,.0f} MB before it: "
              f"+{(k['peak_rss_mb'] - k['base_rss_mb']) / k['file_mb']:.1f}x the file)")


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
    tokenizer_dir = resolve_stage_or_path(args.tokenizer, out_dir, flag="--tokenizer")
    if args.scale_mb:  # the phases run as children, each loading the tokenizer itself
        with tempfile.TemporaryDirectory(dir=args.scale_dir) as tmp:
            figures = bench_scale(tokenizer_dir, args.scale_mb, Path(tmp))
        if args.json:
            print(json.dumps(figures))
        else:
            print_scale(figures)
        return figures
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if args.scale_phase:
        print(json.dumps(run_phase(args.scale_phase, Path(args.scale_file), tokenizer)))
        return {}
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
