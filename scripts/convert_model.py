"""Convert checkpoints between MiniMind and stock transformers Qwen3 / Qwen3-MoE.

    python scripts/convert_model.py export training/sft/checkpoint-500 exported/qwen3
    python scripts/convert_model.py import exported/qwen3 training/imported

`export` writes a directory that plain transformers loads with no code of ours
(`AutoModelForCausalLM.from_pretrained(dir)` gives a `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM`),
so vLLM, llama.cpp converters and the Hub tooling can read it. `import` goes the other way. The
mapping is exact (same tensors, bit for bit; see model/convert.py); tokenizer files and
generation_config.json are copied along.

A checkpoint with no equivalent on the other side (residual dropout, sliding-window attention,
another RoPE type, MoE with dense layers mixed in, another architecture) stops with a one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys
from pathlib import Path

# Tokenizer and generation files travel with the weights; the model's own files are rewritten.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_dirs(src: Path, dst: Path, overwrite: bool) -> None:
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} is not a model directory (no config.json)")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise UsageError(f"{dst} exists and is not empty; pass --overwrite to write into it")
    if dst.resolve() == src.resolve():
        raise UsageError("source and destination are the same directory")


def run_export(src: Path, dst: Path, dtype: str | None) -> str:
    import torch
    from transformers import AutoConfig

    import model  # noqa: F401  registers "minimind" with the Auto classes
    from model import MiniMindForCausalLM
    from model.convert import to_qwen3

    config = AutoConfig.from_pretrained(src)
    if config.model_type != "minimind":
        raise UsageError(f"{src} holds a {config.model_type!r} model, not a MiniMind one (did you mean 'import'?)")
    ours = MiniMindForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype) if dtype else "auto")
    theirs = to_qwen3(ours)
    dst.mkdir(parents=True, exist_ok=True)
    theirs.save_pretrained(dst, safe_serialization=True)
    copy_side_files(src, dst)
    return type(theirs).__name__


def run_import(src: Path, dst: Path, dtype: str | None) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    from model.convert import from_qwen3

    config = AutoConfig.from_pretrained(src)
    if type(config) not in (Qwen3Config, Qwen3MoeConfig):
        raise UsageError(f"{src} holds a {config.model_type!r} model; only qwen3 and qwen3_moe can be imported")
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype) if dtype else "auto")
    ours = from_qwen3(theirs)
    dst.mkdir(parents=True, exist_ok=True)
    ours.save_pretrained(dst, safe_serialization=True)
    copy_side_files(src, dst)
    return type(ours).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_model.py", description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 2 bad input or a checkpoint with no equivalent on the other side.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")
    for name, help_text in (("export", "MiniMind checkpoint -> stock Qwen3 / Qwen3-MoE directory"),
                            ("import", "stock Qwen3 / Qwen3-MoE directory -> MiniMind checkpoint")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src_dir", type=Path, help="directory with config.json and the weights")
        p.add_argument("dst_dir", type=Path, help="output directory (created)")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast the weights (default: keep the checkpoint's dtype)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty dst_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from model.convert import ConversionError

    hf_logging.disable_progress_bar()

    try:
        check_dirs(args.src_dir, args.dst_dir, args.overwrite)
        run = run_export if args.command == "export" else run_import
        cls = run(args.src_dir, args.dst_dir, args.dtype)
    except (UsageError, ConversionError, OSError, ValueError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"convert_model.py {args.command}: error: {message}", file=sys.stderr)
        return 2
    print(f"{args.command}: {args.src_dir} -> {args.dst_dir} ({cls})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
