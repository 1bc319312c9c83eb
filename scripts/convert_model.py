"""Convert checkpoints between MiniMind and stock transformers: Qwen3 / Qwen3-MoE, and MiniMind-V <-> Llava.

    python scripts/convert_model.py export training/sft/checkpoint-500 exported/qwen3
    python scripts/convert_model.py import exported/qwen3 training/imported
    python scripts/convert_model.py export training/vlm/checkpoint-500 exported/llava
    python scripts/convert_model.py import exported/llava training/imported-vlm
    python scripts/convert_model.py gguf training/sft/checkpoint-500 exported/sft.gguf --llama_cpp DIR

`export` writes a directory that plain transformers loads with no code of ours
(`AutoModelForCausalLM.from_pretrained(dir)` gives a `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM`),
so vLLM, llama.cpp converters and the Hub tooling can read it. `import` goes the other way. The
mapping is exact (same tensors, bit for bit; see model/convert.py); tokenizer files and
generation_config.json are copied along.

A MiniMind-V checkpoint (`minimind_vlm`) exports to a `LlavaForConditionalGeneration` directory
(model/convert_vlm.py) with a `LlavaProcessor` beside it: the checkpoint's image processor
(preprocessor_config.json, else SigLIP's default at the tower's image size), its tokenizer and its
chat template. `AutoModelForImageTextToText` and `AutoProcessor` load it, and stock transformers
answers about an image with no code of ours:

    from transformers import pipeline
    pipe = pipeline("image-text-to-text", model="exported/llava")
    pipe(text=[{"role": "user", "content": [{"type": "image", "image": pil_image},
                                            {"type": "text", "text": "What is in the picture?"}]}])

The chat template renders an image part as one `<image>`; LlavaProcessor repeats it once per
patch. `import` turns a Llava directory back into a MiniMind-V checkpoint (a SigLIP tower without
its pooling head becomes our ViT; CLIP and other towers stay transformers modules).

`gguf` exports to Qwen3 in a temporary directory and runs llama.cpp's own `convert_hf_to_gguf.py`
(from the llama-cpp-python source distribution, see model/convert_gguf.py) on it, so llama.cpp,
llama-cpp-python and ollama run the model; an ollama Modelfile is written beside the file.
tests/test_gguf.py checks that llama.cpp tokenises and decodes such a file exactly as we do.

A checkpoint with no equivalent on the other side (residual dropout, sliding-window attention,
another RoPE type, MoE with dense layers mixed in, a Llava with another language model or
projector, another architecture) stops with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json
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

    import model  # noqa: F401  registers "minimind" and "minimind_vlm" with the Auto classes
    from model import MiniMindForCausalLM, MiniMindVLM
    from model.convert import to_qwen3
    from model.convert_vlm import to_llava

    config = AutoConfig.from_pretrained(src)
    if config.model_type not in ("minimind", "minimind_vlm"):
        raise UsageError(f"{src} holds a {config.model_type!r} model, not a MiniMind one (did you mean 'import'?)")
    vlm = config.model_type == "minimind_vlm"
    cls, convert = (MiniMindVLM, to_llava) if vlm else (MiniMindForCausalLM, to_qwen3)
    ours = cls.from_pretrained(src, dtype=getattr(torch, dtype) if dtype else "auto")
    theirs = convert(ours)
    processor = llava_processor(src, ours.config) if vlm else None  # checked before anything is written
    dst.mkdir(parents=True, exist_ok=True)
    theirs.save_pretrained(dst, safe_serialization=True)
    copy_side_files(src, dst)
    if processor is not None:
        processor.save_pretrained(dst)
    return type(theirs).__name__


def llava_processor(src: Path, config):
    """What stock transformers needs to turn a chat with images into Llava's inputs: a LlavaProcessor
    (image processor + tokenizer + chat template), or the image processor alone without a tokenizer."""
    from transformers import AutoTokenizer, LlavaProcessor

    from dataset.images import load_image_processor

    vision = config.vision_config
    image_processor = load_image_processor(src, vision.image_size)
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return image_processor
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_token = getattr(tokenizer, "image_token", None) or "<image>"
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id != config.image_token_id:
        raise UsageError(f"the tokenizer in {src} maps {image_token} to id {image_token_id}, "
                         f"but the model's image_token_id is {config.image_token_id}")
    # The processor writes (S / patch)^2 + num_additional_image_tokens <image> tokens per image, one
    # fewer under "default" (which drops the first token): CLIP's CLS is the one additional token.
    extra = 1 if vision.model_type == "clip_vision_model" else 0
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=extra, image_token=image_token,
                          chat_template=tokenizer.chat_template)


def run_import(src: Path, dst: Path, dtype: str | None) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaConfig, Qwen3Config, Qwen3MoeConfig

    from model.convert import from_qwen3

    config = AutoConfig.from_pretrained(src)
    if type(config) is LlavaConfig:
        return run_import_llava(src, dst, dtype)
    if type(config) not in (Qwen3Config, Qwen3MoeConfig):
        raise UsageError(f"{src} holds a {config.model_type!r} model; only qwen3, qwen3_moe and llava can be imported")
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype) if dtype else "auto")
    ours = from_qwen3(theirs)
    dst.mkdir(parents=True, exist_ok=True)
    ours.save_pretrained(dst, safe_serialization=True)
    copy_side_files(src, dst)
    return type(ours).__name__


def run_import_llava(src: Path, dst: Path, dtype: str | None) -> str:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from model.convert_vlm import from_llava

    theirs = AutoModelForImageTextToText.from_pretrained(src, dtype=getattr(torch, dtype) if dtype else "auto")
    ours = from_llava(theirs)
    dst.mkdir(parents=True, exist_ok=True)
    ours.save_pretrained(dst, safe_serialization=True)
    copy_side_files(src, dst)
    if (src / "preprocessor_config.json").is_file() or (src / "processor_config.json").is_file():
        AutoImageProcessor.from_pretrained(src).save_pretrained(dst)  # our checkpoints keep preprocessor_config.json
    return type(ours).__name__


def run_gguf(src: Path, out: Path, outtype: str, llama_cpp: Path | None, overwrite: bool) -> str:
    import tempfile

    from model.convert_gguf import find_converter, modelfile, qwen3_to_gguf, tokenizer_mismatch

    if not (src / "config.json").is_file():
        raise UsageError(f"{src} is not a model directory (no config.json)")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".gguf":
        raise UsageError(f"{out}: the output is one file and its name must end in .gguf")
    converter = find_converter(llama_cpp)  # every check before minutes of work
    if json.loads((src / "config.json").read_text()).get("model_type") == "minimind_vlm":
        raise UsageError("a MiniMind-V checkpoint has no GGUF export here (llama.cpp keeps the vision tower in a "
                         "separate mmproj file); export the VLM to Llava instead")
    why = tokenizer_mismatch(src)
    if why:
        raise UsageError(why)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwen3-", dir=out.parent) as tmp:
        cls = run_export(src, Path(tmp), None)
        partial = out.with_name(out.name + ".partial")  # a killed conversion never leaves a truncated .gguf
        name = "minimind " + " ".join(src.resolve().parts[-2:])  # e.g. "minimind sft checkpoint-500"
        qwen3_to_gguf(Path(tmp), partial, outtype, converter, name)
        partial.replace(out)
    recipe = out.with_suffix(".Modelfile")
    recipe.write_text(modelfile(out.name))
    return (f"{cls} -> GGUF {outtype}, {out.stat().st_size / 2**20:.1f} MiB; for ollama: "
            f"ollama create {out.stem} -f {recipe}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_model.py", description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 2 bad input or a checkpoint with no equivalent on the other side.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,import,gguf}")
    for name, help_text in (("export", "MiniMind checkpoint -> stock Qwen3 / Qwen3-MoE directory; "
                                       "MiniMind-V checkpoint -> stock Llava directory"),
                            ("import", "stock Qwen3 / Qwen3-MoE directory -> MiniMind checkpoint; "
                                       "stock Llava directory -> MiniMind-V checkpoint")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src_dir", type=Path, help="directory with config.json and the weights")
        p.add_argument("dst_dir", type=Path, help="output directory (created)")
        p.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast the weights (default: keep the checkpoint's dtype)")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty dst_dir")
    from model.convert_gguf import OUTTYPES

    help_text = "MiniMind checkpoint -> one GGUF file for llama.cpp / ollama, via llama.cpp's converter"
    p = sub.add_parser("gguf", help=help_text, description=help_text)
    p.add_argument("src_dir", type=Path, help="MiniMind checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("dst_file", type=Path, help="output file, ending in .gguf")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="tensor type in the file (f32 exact; f16 halves the size; q8_0 quarters it)")
    p.add_argument("--llama_cpp", type=Path, default=None,
                   help="llama.cpp source directory with convert_hf_to_gguf.py (default: $LLAMA_CPP_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dst_file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from model.convert import ConversionError
    from model.convert_gguf import GGUFError

    hf_logging.disable_progress_bar()

    dst = args.dst_file if args.command == "gguf" else args.dst_dir
    try:
        if args.command == "gguf":
            cls = run_gguf(args.src_dir, dst, args.outtype, args.llama_cpp, args.overwrite)
        else:
            check_dirs(args.src_dir, dst, args.overwrite)
            run = run_export if args.command == "export" else run_import
            cls = run(args.src_dir, dst, args.dtype)
    except GGUFError as e:  # the converter's own last lines are the useful part
        print(f"convert_model.py gguf: error: {str(e).strip()}", file=sys.stderr)
        return 2
    except (UsageError, ConversionError, OSError, ValueError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"convert_model.py {args.command}: error: {message}", file=sys.stderr)
        return 2
    print(f"{args.command}: {args.src_dir} -> {dst} ({cls})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
