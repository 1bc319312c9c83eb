"""Pretokenized memmaps and packed blocks: no token lost, duplicated or reordered."""

import json

import numpy as np
import pytest
import torch

from dataset.demo import pretrain_texts
from dataset.pretokenize import PackedBlocks, TokenMemmap, pack_texts, pretokenize, token_dtype

TEXTS = pretrain_texts(40, "train", seed=3) + ["Tom has 23 apples.", "x"]


def _stream(tokenizer, texts) -> list[int]:
    eos = tokenizer.eos_token_id
    return [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in (*ids, eos)]


def test_dtype_follows_vocab_size():
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_memmap_round_trip_equals_in_memory_tokenization(tmp_path, data_tokenizer):
    prefix = pretokenize(TEXTS, data_tokenizer, tmp_path / "corpus" / "train", batch_size=7)
    mm = TokenMemmap(prefix)
    expected = _stream(data_tokenizer, TEXTS)
    assert isinstance(mm.tokens, np.memmap) and mm.tokens.dtype == np.uint16
    assert len(mm) == len(expected) and mm[:].tolist() == expected
    assert (tmp_path / "corpus" / "train.bin").stat().st_size == 2 * len(expected)
    meta = json.loads((tmp_path / "corpus" / "train.meta.json").read_text())
    assert meta == {"dtype": "uint16", "n_tokens": len(expected), "n_docs": len(TEXTS),
                    "vocab_size": len(data_tokenizer), "eos_id": data_tokenizer.eos_token_id}
    assert mm.n_docs == len(TEXTS) and mm.offsets[0] == 0 and mm.offsets[-1] == len(expected)
    assert (mm.tokens[mm.offsets[1:] - 1] == data_tokenizer.eos_token_id).all()
    assert (mm.tokens == mm.eos_id).sum() == len(TEXTS)
    for i in (0, 17, len(TEXTS) - 2, -1):
        assert data_tokenizer.decode(mm.doc(i).tolist()) == TEXTS[i]
    with pytest.raises(IndexError):
        mm.doc(len(TEXTS))


def test_pretokenize_reads_pretrain_jsonl(tmp_path, data_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]) + "\n")
    mm = TokenMemmap(pretokenize(path, data_tokenizer, tmp_path / "p", eos_id=0))
    assert mm.eos_id == 0 and mm.n_docs == 5
    assert mm.doc(4).tolist() == data_tokenizer(TEXTS[4], add_special_tokens=False)["input_ids"]
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("block_size", [1, 16, 37])
def test_blocks_concatenate_to_the_stream_prefix(tmp_path, data_tokenizer, block_size):
    mm = TokenMemmap(pretokenize(TEXTS, data_tokenizer, tmp_path / "c"))
    blocks = PackedBlocks(mm, block_size)
    stream = _stream(data_tokenizer, TEXTS)
    assert len(blocks) == len(stream) // block_size > 0
    items = [blocks[i] for i in range(len(blocks))]
    for item in items:
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (block_size,)
        assert torch.equal(item["input_ids"], item["labels"])
    joined = torch.cat([item["input_ids"] for item in items]).tolist()
    assert joined == stream[: len(blocks) * block_size]
    assert len(stream) - len(joined) < block_size
    assert torch.equal(blocks[-1]["input_ids"], items[-1]["input_ids"])
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_pack_texts_matches_memmap_blocks(tmp_path, data_tokenizer):
    in_memory = pack_texts([{"text": t} for t in TEXTS], data_tokenizer, block_size=32)
    on_disk = PackedBlocks(TokenMemmap(pretokenize(TEXTS, data_tokenizer, tmp_path / "c")), 32)
    assert len(in_memory) == len(on_disk)
    for i in range(len(on_disk)):
        assert torch.equal(in_memory[i]["input_ids"], on_disk[i]["input_ids"])
    loader = torch.utils.data.DataLoader(in_memory, batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32)


def test_labels_are_a_copy_not_a_view():
    blocks = PackedBlocks(np.arange(10), 5)
    item = blocks[1]
    item["labels"][0] = -100
    assert item["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert len(blocks) == 2 and len(PackedBlocks(np.arange(9), 5)) == 1


def test_corrupt_files_are_detected(tmp_path, data_tokenizer):
    prefix = pretokenize(TEXTS[:3], data_tokenizer, tmp_path / "c")
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="do not match"):
        TokenMemmap(prefix)
