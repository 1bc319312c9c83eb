"""Export MiniMind-V to stock Llava and back: same parts, same math, so the numbers must agree.

In-process: to_llava gives our logits and greedy tokens (two images in one sample, one in the
other, so reading order across the batch matters), and from_llava(to_llava(m)) is m bit for bit.
Through the real CLI: exported directories load in a fresh interpreter that never imports our
code (AutoModelForImageTextToText + AutoProcessor + the image-text-to-text pipeline) and reproduce
the logits, greedy tokens, pixels and prompt tokens our side computed; `import` brings them back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoModelForImageTextToText, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlamaConfig, SiglipImageProcessorPil, SiglipVisionConfig)

from model import MiniMindConfig, MiniMindVLM, MiniMindVLMConfig, VisionConfig, VisionTransformer
from model.convert import ConversionError
from model.convert_vlm import from_llava, from_llava_config, to_llava, to_llava_config

from conftest import load_script

convert_model = load_script("convert_model")

IMAGE_TOKEN_ID = 3  # <image> is the 4th special token of the course tokenizer (dataset/chat_template.py)
VOCAB = 300
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=24,
             patch_size=8)  # 3 x 3 = 9 patches per image
TOWERS = {"vit": lambda: VisionConfig(**TOWER),
          "siglip": lambda: SiglipVisionConfig(**TOWER, vision_use_head=True),  # the head keeps it SigLIP on import
          "clip": lambda: CLIPVisionConfig(**TOWER)}
MOE = dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32)
# (tower, text overrides, strategy): tied and untied, dense and MoE, "full" and CLIP's "default".
CASES = {"vit-dense-tied": ("vit", dict(tie_word_embeddings=True), "full"),
         "vit-moe-untied": ("vit", dict(tie_word_embeddings=False, **MOE), "full"),
         "siglip-tower": ("siglip", dict(tie_word_embeddings=False), "full"),
         "clip-tower-default": ("clip", dict(tie_word_embeddings=True), "default")}


def random_vlm(case: str, seed: int = 0) -> MiniMindVLM:
    """A ~0.2M-param VLM with weights large enough (std 0.15) that any mismatch shows in the logits."""
    tower, text, strategy = CASES[case]
    torch.manual_seed(seed)
    lm = MiniMindConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=256,
                        pad_token_id=0, eos_token_id=2, bos_token_id=None, **text)
    m = MiniMindVLM(MiniMindVLMConfig(text_config=lm, vision_config=TOWERS[tower](), image_token_id=IMAGE_TOKEN_ID,
                                      vision_feature_select_strategy=strategy)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m


def sample(n_patches: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, 40]: row 0 holds two images, row 1 one; pixel_values [3, 3, 24, 24] in that order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 40), generator=g)
    for row, start in ((0, 2), (0, 20), (1, 6)):
        ids[row, start:start + n_patches] = IMAGE_TOKEN_ID
    return ids, torch.randn(3, 3, 24, 24, generator=g)


def greedy(m, ids: torch.Tensor, pixels: torch.Tensor, n: int = 8) -> torch.Tensor:
    return m.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)


def assert_same_weights(want: torch.nn.Module, got: torch.nn.Module) -> None:
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_to_llava_matches_and_from_llava_is_exact(case):
    ours = random_vlm(case)
    theirs = to_llava(ours)
    assert type(theirs) is LlavaForConditionalGeneration
    ids, pixels = sample(ours.config.image_seq_length)
    with torch.no_grad():
        a = ours(ids, pixel_values=pixels).logits
        b = theirs(input_ids=ids, pixel_values=pixels).logits
        # The images really enter the logits: without them the image positions read the <image> embedding.
        assert (a - ours(ids).logits).abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-4
    assert torch.equal(greedy(ours, ids[:1], pixels[:2]), greedy(theirs, ids[:1], pixels[:2]))

    back = from_llava(theirs)
    assert_same_weights(ours, back)
    with torch.no_grad():
        assert torch.equal(back(ids, pixel_values=pixels).logits, a)
    if ours.config.tie_word_embeddings:
        assert theirs.lm_head.weight is theirs.model.language_model.embed_tokens.weight
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_siglip_without_head_imports_as_our_vit():
    ours = random_vlm("vit-dense-tied")
    config = to_llava_config(ours.config)
    assert type(config.vision_config) is SiglipVisionConfig and config.vision_config.vision_use_head is False
    assert (config.image_token_index, config.image_seq_length, config.vision_feature_layer) == (IMAGE_TOKEN_ID, 9, -1)
    assert type(from_llava(to_llava(ours)).vision_tower) is VisionTransformer
    assert type(from_llava_config(to_llava_config(random_vlm("siglip-tower").config)).vision_config) is SiglipVisionConfig


def test_configs_with_no_equivalent_are_refused():
    vit_relu = random_vlm("vit-dense-tied").config
    vit_relu.vision_config.hidden_act = "relu"  # our ViT would run exact GELU, SigLIP a ReLU
    with pytest.raises(ConversionError, match="hidden_act"):
        to_llava_config(vit_relu)
    good = to_llava_config(random_vlm("vit-dense-tied").config)
    for field, value, match in (("vision_feature_layer", [-2, -1], "vision_feature_layer"),
                                ("projector_hidden_act", "gelu_pytorch_tanh", "projector")):
        bad = LlavaConfig.from_dict({**good.to_dict(), field: value})
        with pytest.raises(ConversionError, match=match):
            from_llava_config(bad)


@pytest.fixture(scope="module")
def tokenizer():
    """The course tokenizer (stage 0's builder: <image> is a special token, the chat template set), vocab 300."""
    from dataset.demo import pretrain_texts
    from trainer.train_0_tokenizer import build_tokenizer

    tok = build_tokenizer(iter(pretrain_texts(100, "train")), vocab_size=VOCAB, min_frequency=2)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and len(tok) == VOCAB
    return tok


def make_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (30 + seed, 40, 3), dtype=np.uint8))


CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]

CLEAN_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    report = {}
    for path in sys.argv[1:-1]:
        want = json.load(open(path + "/ours.json"))
        m = AutoModelForImageTextToText.from_pretrained(path).eval()
        proc = AutoProcessor.from_pretrained(path)
        ids, pixels = torch.tensor(want["input_ids"]), torch.tensor(want["pixel_values"])
        images = [Image.open(path + f"/image{i}.png") for i in range(len(want["pixel_values"]))]
        with torch.no_grad():
            logits = m(input_ids=ids, pixel_values=pixels).logits
        gen = m.generate(input_ids=ids[:1], pixel_values=pixels[:2], max_new_tokens=8, min_new_tokens=8,
                         do_sample=False, pad_token_id=0)
        chat = json.load(open(path + "/chat.json"))
        prompt = proc.apply_chat_template(chat, add_generation_prompt=True)
        inputs = proc(images=images[:1], text=prompt, return_tensors="pt")
        chat[0]["content"][0]["image"] = images[0]
        pipe = pipeline("image-text-to-text", model=path)
        answer = pipe(text=chat, generate_kwargs=dict(max_new_tokens=6, min_new_tokens=6, do_sample=False))
        report[path] = {
            "classes": [type(m).__name__, type(proc).__name__, type(proc.image_processor).__name__],
            "logits_max_diff": (logits - torch.tensor(want["logits"])).abs().max().item(),
            "greedy": gen.tolist(),
            "pixels_max_diff": (proc.image_processor(images, return_tensors="pt")["pixel_values"]
                                - pixels).abs().max().item(),
            "chat_ids": inputs["input_ids"].tolist(),
            "pipeline": answer[0]["generated_text"][-1]["content"],
        }
    report["model_imported"] = any(name == "model" or name.startswith("model.") for name in sys.modules)
    json.dump(report, open(sys.argv[-1], "w"))
""")


def save_checkpoint(case: str, seed: int, tokenizer, root: Path,
                    image_processor=None) -> tuple[MiniMindVLM, Path, dict, list[Image.Image]]:
    """A VLM checkpoint dir as training leaves it (weights, tokenizer, maybe preprocessor_config.json),
    plus ours.json: the numbers our side computes for the clean interpreter to reproduce."""
    from dataset.images import load_image_processor, to_pixels

    ours, src = random_vlm(case, seed), root / "ours"
    ours.save_pretrained(src)
    tokenizer.save_pretrained(src)
    if image_processor is not None:
        image_processor.save_pretrained(src)
    images = [make_image(i) for i in range(3)]
    pixels = to_pixels(load_image_processor(src, 24), images)
    ids, _ = sample(ours.config.image_seq_length)
    n = ours.config.image_seq_length
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(prompt.replace("<image>", "<image>" * n), add_special_tokens=False,
                         return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = {"input_ids": ids.tolist(), "pixel_values": pixels.tolist(),
                "logits": ours(ids, pixel_values=pixels).logits.tolist(),
                "greedy": greedy(ours, ids[:1], pixels[:2]).tolist(), "chat_ids": chat_ids.tolist(),
                "answer": tokenizer.decode(greedy(ours, chat_ids, pixels[:1], n=6)[0, chat_ids.shape[1]:],
                                           skip_special_tokens=True)}
    return ours, src, want, images


def test_export_runs_in_stock_transformers_and_imports_back(tokenizer, tmp_path):
    """ViT with a saved (non-default) SigLIP image processor; SigLIP and CLIP towers with none (SigLIP's
    default at the tower's size is exported). One clean interpreter checks all three exports."""
    custom = SiglipImageProcessorPil(size={"height": 24, "width": 24}, image_mean=[0.48, 0.46, 0.41],
                                     image_std=[0.27, 0.26, 0.28])
    runs = {}
    for seed, (case, processor) in enumerate((("vit-dense-tied", custom), ("siglip-tower", None),
                                              ("clip-tower-default", None))):
        root = tmp_path / case
        ours, src, want, images = save_checkpoint(case, seed + 10, tokenizer, root, processor)
        dst = root / "llava"
        assert convert_model.main(["export", str(src), str(dst)]) == 0
        (dst / "ours.json").write_text(json.dumps(want))
        (dst / "chat.json").write_text(json.dumps(CHAT))
        for i, image in enumerate(images):
            image.save(dst / f"image{i}.png")
        runs[case] = ours, dst, want

    report_path = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", CLEAN_LOADER, *(str(r[1]) for r in runs.values()), str(report_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["model_imported"] is False
    for case, (ours, dst, want) in runs.items():
        got = report[str(dst)]
        assert got["classes"] == ["LlavaForConditionalGeneration", "LlavaProcessor", "SiglipImageProcessorPil"], case
        assert got["logits_max_diff"] <= 1e-4, case
        assert got["greedy"] == want["greedy"], case
        assert got["pixels_max_diff"] <= 1e-6, case  # the checkpoint's own processor, or the same default
        assert got["chat_ids"] == want["chat_ids"], case  # chat template + 9 <image> tokens per image
        assert got["pipeline"] == want["answer"], case

        assert convert_model.main(["import", str(dst), str(dst.parent / "back")]) == 0
        back = AutoModelForImageTextToText.from_pretrained(dst.parent / "back")
        assert type(back) is MiniMindVLM
        assert type(back.vision_tower) is type(ours.vision_tower), case
        assert_same_weights(ours, back)
        ids, pixels = torch.tensor(want["input_ids"]), torch.tensor(want["pixel_values"])
        with torch.no_grad():
            assert (back(ids, pixel_values=pixels).logits - torch.tensor(want["logits"])).abs().max() <= 1e-5
        assert (dst.parent / "back" / "preprocessor_config.json").is_file()


def test_cli_vlm_errors_in_one_line(tokenizer, tmp_path, capsys):
    """A tokenizer whose <image> id is not the model's, and a Llava around a Llama: exit 2, one line."""
    ours = random_vlm("vit-dense-tied")
    ours.config.image_token_id = 5
    ours.save_pretrained(tmp_path / "wrong-id")
    tokenizer.save_pretrained(tmp_path / "wrong-id")
    llama = LlavaConfig(vision_config=SiglipVisionConfig(**TOWER), image_token_index=IMAGE_TOKEN_ID,
                        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=1, num_attention_heads=2))
    LlavaForConditionalGeneration(llama).save_pretrained(tmp_path / "llava-llama")
    for command, name, expected in (("export", "wrong-id", "image_token_id"), ("import", "llava-llama", "llama")):
        capsys.readouterr()
        assert convert_model.main([command, str(tmp_path / name), str(tmp_path / f"{name}-out")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"convert_model.py {command}: error:") and err.count("\n") == 1, err
        assert expected in err, err
    assert not (tmp_path / "wrong-id-out").exists()
