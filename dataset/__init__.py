"""Data for every stage: MiniMind's jsonl formats (:mod:`dataset.jsonl`), the generated demo world
(:mod:`dataset.demo`) and memory-mapped pretokenized corpora (:mod:`dataset.pretokenize`).

The package is named ``dataset`` like MiniMind's folder, which also holds MiniMind's own jsonl
files when a learner downloads them (see :data:`dataset.jsonl.DEFAULT_FILES`).
"""

from dataset.demo import DemoSizes, extract_answer, tokenizer_corpus, unigram_entropy, write_demo_data
from dataset.jsonl import (
    DEFAULT_FILES,
    DataError,
    LoadReport,
    find_default_file,
    iter_records,
    load_records,
    normalise_record,
)
from dataset.pretokenize import PackedBlocks, TokenMemmap, pack_texts, pretokenize

__all__ = [
    "DEFAULT_FILES",
    "DataError",
    "DemoSizes",
    "LoadReport",
    "PackedBlocks",
    "TokenMemmap",
    "extract_answer",
    "find_default_file",
    "iter_records",
    "load_records",
    "normalise_record",
    "pack_texts",
    "pretokenize",
    "tokenizer_corpus",
    "unigram_entropy",
    "write_demo_data",
]
