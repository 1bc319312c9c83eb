"""Speed of our decoder against stock transformers Qwen3 holding the very same weights.

    python scripts/bench_model.py                        # tiny + small, ~2-3 min on 2 CPU cores
    python scripts/bench_model.py --presets tiny --steps 10 --compile

For each preset: one MiniMind model, and `model.convert.to_qwen3` of it (same config, same
tensors), so any difference is code, not numbers. Measured, alternating ours/stock step by step so
that the noise of a shared machine hits both alike, and reported as medians:
  - train: tokens/s of forward + backward + AdamW step at seq 256 (batch 8 tiny, 4 larger);
  - decode: tokens/s of cached greedy generation at batch 1 (forced to --new_tokens tokens).
`--attention` adds a micro-benchmark of the GQA choices inside attention (repeat the kv heads and
call SDPA, SDPA's own `enable_gqa=True`, and for one-token decoding folding the query heads of a
group onto their kv head), which is where the two implementations differ.
"""

from __future__ import annotations

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import MiniMindForCausalLM, config_from_preset, count_parameters  # noqa: E402
from model.convert import to_qwen3  # noqa: E402

BATCH = {"tiny": 8, "tiny-moe": 8}  # others: 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model presets (model/config.py)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per model")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 8 for tiny, 4 otherwise)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per decode run")
    p.add_argument("--decode_runs", type=int, default=3, help="timed decode runs per model")
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models for training (first step timed apart); decoding stays eager")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--attention", action="store_true", help="also time the GQA variants of attention alone")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(m, opt, ids):
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_train(models: dict, args, batch: int) -> dict[str, float]:
    """Median tokens/s of a full optimizer step; the two models alternate step by step."""
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (batch, args.seq_len), generator=g)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, m in models.items():
        m.train()
        first = timed(lambda: train_step(m, opts[name], ids))
        if args.compile:
            print(f"  {name}: first (compiling) training step {first:.1f}s")
    for step in range(args.warmup - 1 + args.steps):
        for name, m in models.items():
            t = timed(lambda: train_step(m, opts[name], ids))
            if step >= args.warmup - 1:
                times[name].append(t)
    return {name: batch * args.seq_len / statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def bench_decode(models: dict, args) -> dict[str, float]:
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=g)
    n = args.new_tokens
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    outputs, times = {}, {name: [] for name in models}
    for name, m in models.items():
        m.eval()
        outputs[name] = m.generate(prompt, **kwargs)  # warm-up (and compile)
    for _ in range(args.decode_runs):
        for name, m in models.items():
            times[name].append(timed(lambda: m.generate(prompt, **kwargs)))
    same = torch.equal(*outputs.values())
    return {**{name: n / statistics.median(ts) for name, ts in times.items()}, "same_tokens": same}


def bench_attention(preset: str, args) -> None:
    """Forward+backward of SDPA alone at the preset's shapes, and one decode step against 512 keys."""
    cfg = config_from_preset(preset, vocab_size=args.vocab_size)
    H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep, B, T = H // K, args.batch or BATCH.get(preset, 4), args.seq_len

    def repeat(x):
        return x[:, :, None].expand(-1, -1, rep, -1, -1).reshape(x.shape[0], H, -1, D)

    def train(kind):
        q = torch.randn(B, H, T, D, requires_grad=True)
        k, v = (torch.randn(B, K, T, D, requires_grad=True) for _ in range(2))
        if kind == "repeat":
            out = F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()

    def decode(kind):
        q, k, v = torch.randn(1, H, 1, D), torch.randn(1, K, 512, D), torch.randn(1, K, 512, D)
        if kind == "repeat":
            F.scaled_dot_product_attention(q, repeat(k), repeat(v))
        elif kind == "enable_gqa":
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # fold: [1, H, 1, D] -> [1, K, rep, D]: each kv head meets its group of queries at once
            F.scaled_dot_product_attention(q.view(1, K, rep, D), k, v)

    def best(fn, kind, n):
        fn(kind)
        return min(timed(lambda: fn(kind)) for _ in range(n)) * 1e3

    print(f"\nattention alone, {preset}: H={H} K={K} D={D}; train B={B} T={T} (fwd+bwd, causal), decode 1 query vs 512 keys")
    print(f"  train  repeat kv + SDPA {best(train, 'repeat', 10):7.2f} ms | SDPA enable_gqa {best(train, 'gqa', 10):7.2f} ms")
    print(f"  decode repeat kv + SDPA {best(decode, 'repeat', 200):7.3f} ms | SDPA enable_gqa "
          f"{best(decode, 'enable_gqa', 200):7.3f} ms | fold queries {best(decode, 'fold', 200):7.3f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, seq {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, decode {args.new_tokens} tokens x {args.decode_runs}"
          + (", torch.compile" if args.compile else ""))
    rows = []
    for preset in args.presets:
        torch.manual_seed(args.seed)
        ours = MiniMindForCausalLM(config_from_preset(preset, vocab_size=args.vocab_size, pad_token_id=0))
        theirs = to_qwen3(ours)
        print(f"\n{preset}: {count_parameters(ours)['total'] / 1e6:.1f}M params; stock {type(theirs).__name__} "
              f"(attn {theirs.config._attn_implementation})")
        models = {"ours": ours, "stock": theirs}
        if args.compile:
            models = {name: torch.compile(m) for name, m in models.items()}
        batch = args.batch or BATCH.get(preset, 4)
        train = bench_train(models, args, batch)
        print(f"  train  tokens/s  ours {train['ours']:8.0f}  stock {train['stock']:8.0f}  ratio {train['ours'] / train['stock']:.2f}")
        if args.compile:
            # generate() on a compiled module goes through the wrapped model's own generate.
            models = {name: getattr(m, "_orig_mod", m) for name, m in models.items()}
        decode = bench_decode(models, args)
        print(f"  decode tokens/s  ours {decode['ours']:8.1f}  stock {decode['stock']:8.1f}  ratio "
              f"{decode['ours'] / decode['stock']:.2f}  (same tokens: {decode['same_tokens']})")
        rows.append((preset, batch, train, decode))
        if args.attention:
            bench_attention(preset, args)

    print("\n| preset | batch | train tok/s ours | stock | ratio | decode tok/s ours | stock | ratio | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, batch, train, decode in rows:
        print(f"| {preset} | {batch} | {train['ours']:.0f} | {train['stock']:.0f} | {train['ours'] / train['stock']:.2f} "
              f"| {decode['ours']:.1f} | {decode['stock']:.1f} | {decode['ours'] / decode['stock']:.2f} | {decode['same_tokens']} |")
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
