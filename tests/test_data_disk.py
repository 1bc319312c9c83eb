"""trainer/lib/data.py's disk_dataset: SFT and DPO records go to Arrow files on disk and are memory-mapped
back, with the same rows `Dataset.from_list` would build, however late a field first appears."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

import trainer.lib.data as data
from dataset.jsonl import DataError


def chat_line(i: int, **extra) -> dict:
    return {"conversations": [{"role": "user", "content": f"What is {i} + 1?"},
                              {"role": "assistant", "content": f"{i + 1}", **extra}]}


def write(path, records, bad_at: int | None = None) -> None:
    lines = [json.dumps(r) for r in records]
    if bad_at is not None:
        lines.insert(bad_at, '{"conversations": [{"role": "bot", "content": "x"}]}')
    path.write_text("\n".join(lines) + "\n")


def test_rows_equal_from_list_when_a_field_first_appears_after_the_first_batch(tmp_path):
    """Batches of 4: reasoning_content and tool_calls (with differently shaped arguments) only in
    records 9 and 11; a schema fixed by the first batch would fail on them."""
    records = [chat_line(i) for i in range(12)]
    records[9] = chat_line(9, reasoning_content="9 + 1 is 10", tool_calls=[{"name": "add", "arguments": {"a": 9}}])
    records[11] = chat_line(11, tool_calls=[{"name": "say", "arguments": {"text": "12"}}])
    path = tmp_path / "chat.jsonl"
    write(path, records)
    on_disk = data.disk_dataset(path, "chat", tmp_path / "cache", batch=4)
    in_memory = Dataset.from_list(data.chat_rows(path))
    assert on_disk.cache_files and len(on_disk) == 12
    assert list(on_disk) == list(in_memory)
    assert on_disk[9]["messages"][1]["tool_calls"][0]["arguments"]["a"] == 9


def test_pairs_and_the_cache(tmp_path, monkeypatch):
    """DPO pairs too; a second load with the file unchanged reads only the Arrow cache, a changed
    file is read again."""
    path = tmp_path / "dpo.jsonl"
    pairs = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
              "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}]}
             for i in range(5)]
    write(path, pairs)
    first = data.pair_dataset(path, tmp_path / "cache")
    assert list(first) == list(Dataset.from_list(data.pair_rows(path)))

    def unreadable(*args, **kwargs):
        raise AssertionError("the file was read again")

    with monkeypatch.context() as m:
        m.setattr(data, "iter_records", unreadable)
        assert list(data.pair_dataset(path, tmp_path / "cache")) == list(first)
    write(path, pairs[:3])
    assert len(data.pair_dataset(path, tmp_path / "cache")) == 3


def test_bad_lines_stop_or_are_skipped_and_said_every_run(tmp_path):
    from loguru import logger

    path = tmp_path / "chat.jsonl"
    write(path, [chat_line(i) for i in range(6)], bad_at=3)
    with pytest.raises(DataError, match=r"chat.jsonl:4: field 'conversations\[0\].role'"):
        data.chat_dataset(path, tmp_path / "cache")
    warnings = []
    sink = logger.add(lambda m: warnings.append(m), level="WARNING")
    try:
        for _ in range(2):  # the second run comes from the cache and still says what it skipped
            assert len(data.chat_dataset(path, tmp_path / "cache", skip_bad_lines=True)) == 6
    finally:
        logger.remove(sink)
    assert len(warnings) == 2 and all("skipped 1 bad line" in w for w in warnings)
