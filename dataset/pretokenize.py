"""Pretraining data as one long token stream: tokenize once to disk, then read blocks in constant memory.

Pretraining does not care where documents end, only that the model sees where one ends: every
document is tokenized, followed by the EOS id (``<|im_end|>`` in this course), and all of them are
concatenated into a single 1-D stream::

    doc0 tokens  EOS  doc1 tokens  EOS  doc2 tokens  EOS ...

:func:`pretokenize` writes that stream to ``<prefix>.bin`` (raw ``uint16`` when the vocabulary has
fewer than 65,536 ids, else ``uint32``: half the disk and page cache for small vocabularies),
``<prefix>.idx.npy`` (``int64[n_docs + 1]``: document ``i`` occupies ``[idx[i], idx[i + 1])`` of the
stream, its EOS included, and ``idx[-1] == n_tokens``) and ``<prefix>.meta.json`` (dtype, n_tokens,
n_docs, vocab_size, eos_id). :class:`TokenMemmap` opens them with ``np.memmap``, so a corpus larger
than RAM costs almost nothing to open.

:class:`PackedBlocks` cuts the stream into consecutive, non-overlapping blocks of ``block_size``
tokens (``input_ids`` and identical ``labels``: Hugging Face causal LMs shift labels internally).
No padding is needed and no token is wasted, except the final partial block, which is dropped.
A block may span a document boundary; the EOS between documents tells the model where one story
ends, as in GPT-2 / nanoGPT pretraining. For small jsonl corpora :func:`pack_texts` does the same in
memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.jsonl import iter_records


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits in 16 bits (``vocab_size <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _texts(source: str | Path | Iterable[str | dict]) -> Iterator[str]:
    if isinstance(source, (str, Path)):
        yield from (r["text"] for r in iter_records(source, "pretrain"))
        return
    for item in source:
        yield item["text"] if isinstance(item, dict) else item


def _resolve_eos(tokenizer, eos_id: int | None) -> int:
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_id explicitly")
    return int(eos_id)


def encode_documents(
    texts: Iterable[str], tokenizer, eos_id: int | None = None, batch_size: int = 1000
) -> Iterator[list[int]]:
    """Token ids of each text followed by ``eos_id``, tokenized ``batch_size`` texts at a time."""
    eos_id = _resolve_eos(tokenizer, eos_id)
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield [*ids, eos_id]
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def pretokenize(
    records_or_jsonl: str | Path | Iterable[str | dict],
    tokenizer,
    out_prefix: str | Path,
    eos_id: int | None = None,
    batch_size: int = 1000,
) -> Path:
    """Tokenize every document to ``<out_prefix>.bin`` / ``.idx.npy`` / ``.meta.json``; returns the prefix.

    ``records_or_jsonl`` is a pretraining jsonl path (``{"text"}`` lines, validated by
    :func:`dataset.jsonl.iter_records`), or an iterable of strings or ``{"text"}`` dicts. ``eos_id``
    defaults to ``tokenizer.eos_token_id``. The token file is streamed to disk, so memory stays
    bounded by one batch plus the offsets (8 bytes per document). Files appear atomically.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos_id = _resolve_eos(tokenizer, eos_id)
    total = len(records_or_jsonl) if isinstance(records_or_jsonl, Sequence) else None
    bin_path = Path(f"{out_prefix}.bin")
    # Temporary names are per process: under torchrun every rank may pretokenize the same corpus at
    # once; each writes its own files, and the identical results replace one another atomically.
    tmp = f"tmp{os.getpid()}"
    tmp_bin = Path(f"{out_prefix}.bin.{tmp}")
    offsets = [0]
    with tmp_bin.open("wb") as f:
        docs = encode_documents(_texts(records_or_jsonl), tokenizer, eos_id, batch_size)
        for ids in tqdm(docs, total=total, desc=f"pretokenize {out_prefix.name}", unit="doc"):
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            offsets.append(offsets[-1] + len(ids))
    n_docs = len(offsets) - 1
    if n_docs == 0:
        tmp_bin.unlink()
        raise ValueError("no documents to pretokenize")
    idx_path = Path(f"{out_prefix}.idx.npy")
    with open(f"{out_prefix}.idx.{tmp}.npy", "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    os.replace(f"{out_prefix}.idx.{tmp}.npy", idx_path)
    os.replace(tmp_bin, bin_path)
    meta = {"dtype": dtype.name, "n_tokens": offsets[-1], "n_docs": n_docs,
            "vocab_size": vocab_size, "eos_id": eos_id}
    Path(f"{out_prefix}.meta.json.{tmp}").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(f"{out_prefix}.meta.json.{tmp}", f"{out_prefix}.meta.json")
    return out_prefix


class TokenMemmap:
    """A read-only view of a :func:`pretokenize` output: ``len()`` tokens, ``doc(i)``, slicing.

    ``tokens`` is an ``np.memmap`` of shape ``[n_tokens]``; ``offsets`` is ``int64[n_docs + 1]``.
    Opening costs constant memory; pages are read from disk as slices are touched.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.meta = json.loads(Path(f"{self.prefix}.meta.json").read_text())
        self.tokens = np.memmap(f"{self.prefix}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
        self.offsets = np.load(f"{self.prefix}.idx.npy", mmap_mode="r")
        if len(self.tokens) != self.meta["n_tokens"] or len(self.offsets) != self.meta["n_docs"] + 1:
            raise ValueError(f"{self.prefix}: .bin/.idx.npy do not match .meta.json (rewrite them)")

    def __repr__(self) -> str:
        return f"TokenMemmap({str(self.prefix)!r}, n_tokens={len(self)}, n_docs={self.n_docs})"

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, key):
        return self.tokens[key]

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` without its trailing EOS."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range ({self.n_docs} documents)")
        i %= self.n_docs
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1]) - 1]


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed-length training blocks cut from an EOS-joined token stream.

    Item ``i`` is ``{"input_ids": LongTensor[block_size], "labels": LongTensor[block_size]}`` holding
    stream positions ``[i * block_size, (i + 1) * block_size)``; ``labels`` equals ``input_ids``
    (the model shifts). Blocks are consecutive and non-overlapping; the last partial block is
    dropped, so ``len(self) == n_tokens // block_size``. ``tokens`` is a :class:`TokenMemmap`
    (read lazily from disk) or any in-memory 1-D array of ids.
    """

    def __init__(self, tokens: TokenMemmap | np.ndarray | Sequence[int], block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.tokens = tokens.tokens if isinstance(tokens, TokenMemmap) else np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"expected a 1-D token stream, got shape {self.tokens.shape}")
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range ({len(self)} blocks)")
        i %= len(self)
        start = i * self.block_size
        ids = torch.from_numpy(np.array(self.tokens[start : start + self.block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def pack_texts(
    texts: Iterable[str | dict], tokenizer, block_size: int, eos_id: int | None = None
) -> PackedBlocks:
    """In-memory :class:`PackedBlocks` for a small corpus (strings or ``{"text"}`` records)."""
    ids = [t for doc in encode_documents(_texts(texts), tokenizer, eos_id) for t in doc]
    return PackedBlocks(np.asarray(ids, dtype=token_dtype(len(tokenizer))), block_size)
