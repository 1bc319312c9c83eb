"""The VLM (model/vlm.py, model/vision.py) and its data path (dataset/vlm.py): placeholder expansion and
label masks token by token, splice shapes, cached decoding with images, several images per sample,
bad image inputs, a pretrained tower plugged in, the phase freezing."""

import io
import json

import pytest
import torch
from PIL import Image

import model as mm
from dataset.chat_template import IMAGE
from dataset.jsonl import DataError
from dataset.vlm import encode_vlm, expand_image_tokens, load_vlm_records


def tiny_vlm(vocab: int = 64, image_token_id: int = 3, **vision) -> mm.MiniMindVLM:
    torch.manual_seed(0)
    text = mm.config_from_preset("tiny", vocab_size=vocab, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128)
    vcfg = mm.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8, **vision)
    return mm.MiniMindVLM(mm.MiniMindVLMConfig(text_config=text, vision_config=vcfg, image_token_id=image_token_id)).eval()


def png(colour=(255, 0, 0), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_placeholder_expands_and_never_carries_labels(stage_out_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stage_out_dir / "tokenizer")
    image_id = tok.convert_tokens_to_ids(IMAGE)
    assert tok.tokenize(f"a {IMAGE}b") == ["a", "Ġ", IMAGE, "b"]  # one special token, never split
    msgs = [{"role": "user", "content": f"{IMAGE}\nWhat colour?"}, {"role": "assistant", "content": "red"}]
    enc = encode_vlm(tok, msgs, image_id, n_image_tokens=4)
    ids, labels = enc["input_ids"], enc["labels"]
    plain = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert ids == expand_image_tokens(plain, image_id, 4) and len(ids) == len(plain) + 3
    start = ids.index(image_id)
    assert ids[start:start + 4] == [image_id] * 4 and image_id not in ids[start + 4:]
    # Token by token: exactly the assistant reply and its <|im_end|> are learned.
    answer = tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    learned = [t for t, lab in zip(ids, labels) if lab != -100]
    assert learned == answer
    assert all(lab == -100 for t, lab in zip(ids, labels) if t == image_id)
    assert [lab for lab in labels if lab != -100] == [t for t, lab in zip(ids, labels) if lab != -100]


def test_splice_puts_patch_features_at_image_tokens_in_reading_order():
    embeds = torch.zeros(2, 5, 3)
    ids = torch.tensor([[9, 3, 3, 9, 9], [3, 3, 9, 9, 9]])
    features = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3)  # 2 images x 2 patches x 3
    out = mm.splice_image_features(embeds, ids, features, image_token_id=3)
    assert torch.equal(out[0, 1:3], features[0]) and torch.equal(out[1, 0:2], features[1])
    assert out[ids != 3].abs().sum() == 0
    with pytest.raises(ValueError, match="3 <image> tokens .* 2 image"):
        mm.splice_image_features(embeds, torch.tensor([[3, 3, 3, 9, 9], [9] * 5]), features, 3)


def test_features_shape_and_cached_decoding_equals_uncached_with_two_images():
    vlm = tiny_vlm()
    n = vlm.config.image_seq_length
    assert n == 4 and vlm.get_image_features(torch.randn(2, 3, 16, 16)).shape == (2, 4, 64)
    ids = torch.tensor([[1, 5] + [3] * n + [6] + [3] * n + [7, 8]])
    pixels = torch.randn(2, 3, 16, 16)
    cached = vlm.generate(ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    full = ids
    for _ in range(6):
        logits = vlm(input_ids=full, pixel_values=pixels, use_cache=False).logits[:, -1]
        full = torch.cat([full, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, full)
    # Each image matters, and where it goes matters: swapping them changes the logits.
    a = vlm(input_ids=ids, pixel_values=pixels).logits
    b = vlm(input_ids=ids, pixel_values=pixels.flip(0)).logits
    assert not torch.allclose(a, b)


def test_save_load_roundtrip_through_auto_class(tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm = tiny_vlm()
    vlm.save_pretrained(tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path)
    ids, px = torch.tensor([[1] + [3] * 4 + [5]]), torch.randn(1, 3, 16, 16)
    assert type(back) is mm.MiniMindVLM
    assert torch.equal(back(input_ids=ids, pixel_values=px).logits, vlm(input_ids=ids, pixel_values=px).logits)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied


def conv(text=f"{IMAGE}\nWhat?", answer="red"):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [b for _, b in rows]
    if any(isinstance(b, list) for b in blobs):  # a column is all binary or all lists of binary
        blobs = [b if isinstance(b, list) else [b] for b in blobs]
    pq.write_table(pa.table({"conversations": [json.dumps(c) for c, _ in rows], "image_bytes": blobs}), path)


def test_parquet_and_jsonl_records_load_with_several_images(tmp_path):
    write_parquet(tmp_path / "a.parquet", [(conv(), png()), (conv(f"{IMAGE}{IMAGE} Same?", "no"), [png(), png((0, 0, 255))])])
    recs = load_vlm_records(tmp_path / "a.parquet")
    assert [len(r["images"]) for r in recs] == [1, 2] and recs[1]["where"].endswith(":2")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png())
    (tmp_path / "img" / "y.png").write_bytes(png((0, 255, 0)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversations": conv(f"{IMAGE} {IMAGE}"), "image": "x.png, y.png"}) + "\n")
    recs = load_vlm_records(tmp_path / "b.jsonl", tmp_path / "img")
    assert len(recs[0]["images"]) == 2 and recs[0]["images"][1] == png((0, 255, 0))


def test_bad_images_name_the_file_row_and_image(tmp_path):
    write_parquet(tmp_path / "bad.parquet", [(conv(), png()), (conv(), b"not an image"), (conv("no placeholder"), png())])
    with pytest.raises(DataError, match=r"bad.parquet:2: field 'image': image 'image_bytes\[0\]' is not a readable"):
        load_vlm_records(tmp_path / "bad.parquet")
    from dataset.jsonl import LoadReport
    from dataset.vlm import iter_vlm_records

    report = LoadReport()
    kept = list(iter_vlm_records(tmp_path / "bad.parquet", skip_bad_lines=True, report=report))
    assert len(kept) == 1 and report.skipped == 2
    assert "0 <image> placeholder(s) but 1 image(s) (row 3)" in str(report.errors[1])
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": conv(), "image": "x.png"}) + "\n"
                                      + json.dumps({"conversations": conv(), "image": "missing.png"}) + "\n")
    (tmp_path / "x.png").write_bytes(png())
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'image': image 'missing.png' not found"):
        load_vlm_records(tmp_path / "c.jsonl")


def test_a_local_siglip_or_clip_tower_plugs_in(tmp_path, stage_out_dir):
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    from trainer.lib.vlm_model import build_vlm, set_trainable, trainable_table

    tok = AutoTokenizer.from_pretrained(stage_out_dir / "tokenizer")
    lm_dir = stage_out_dir / "pretrain" / "checkpoint-1"
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8)
    for cls, cfg, strategy in ((SiglipVisionModel, SiglipVisionConfig(**small, vision_use_head=False), "full"),
                               (CLIPVisionModel, CLIPVisionConfig(**small), "default")):
        torch.manual_seed(0)
        tower_dir = tmp_path / cls.__name__
        cls(cfg).save_pretrained(tower_dir)
        vlm = build_vlm(lm_dir, tok, tower_dir=tower_dir)
        assert vlm.config.vision_feature_select_strategy == strategy and vlm.config.image_seq_length == 4
        theirs = cls.from_pretrained(tower_dir).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in vlm.vision_tower.state_dict().items())
        assert vlm.get_image_features(torch.randn(1, 3, 16, 16)).shape == (1, 4, 64)  # CLIP's CLS dropped
        set_trainable(vlm, phase=1)
        assert not any(p.requires_grad for p in vlm.vision_tower.parameters())  # a pretrained tower stays frozen
        assert "vision tower 0.00M" in trainable_table(vlm)


def test_phases_freeze_what_they_say(stage_out_dir):
    from transformers import AutoTokenizer

    from trainer.lib.vlm_model import build_vlm, set_trainable

    tok = AutoTokenizer.from_pretrained(stage_out_dir / "tokenizer")
    vlm = build_vlm(stage_out_dir / "pretrain" / "checkpoint-1", tok)

    def trains(module) -> set[bool]:
        return {p.requires_grad for p in module.parameters()}

    set_trainable(vlm, phase=1)
    assert trains(vlm.model) == {False} and not vlm.lm_head.weight.requires_grad
    assert trains(vlm.vision_tower) == trains(vlm.multi_modal_projector) == {True}
    set_trainable(vlm, phase=2)
    assert trains(vlm.model) == {True}
    set_trainable(vlm, phase=2, lm_layers=1)
    assert trains(vlm.model.layers[-1]) == {True} and trains(vlm.model.layers[0]) == {False}
    assert not vlm.model.embed_tokens.weight.requires_grad


def test_build_vlm_loads_every_lm_weight_and_refuses_a_tokenizer_without_image(stage_out_dir, data_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.lib.stages import StageError
    from trainer.lib.vlm_model import build_vlm

    lm_dir = stage_out_dir / "pretrain" / "checkpoint-1"
    vlm = build_vlm(lm_dir, AutoTokenizer.from_pretrained(stage_out_dir / "tokenizer"))
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    ours = vlm.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in lm.state_dict().items())
    with pytest.raises(StageError, match="has no <image> token"):
        build_vlm(lm_dir, data_tokenizer)


def test_minimind_v_mnist_files_load_in_both_formats(data_shared_dir):
    """The real handwritten digits of ../shared/data in MiniMind-V's parquet and in jsonl + image dir."""
    from dataset.images import decode_image

    parquet = load_vlm_records(data_shared_dir / "vlm_mnist.parquet")
    jsonl = load_vlm_records(data_shared_dir / "vlm_mnist.jsonl", data_shared_dir)
    assert len(parquet) == len(jsonl) == 2000
    assert parquet[0]["images"] == jsonl[0]["images"]  # the same PNG bytes either way
    assert decode_image(parquet[0]["images"][0]).size == (28, 28)
    assert {r["messages"][-1]["content"] for r in parquet} == {str(d) for d in range(10)}
