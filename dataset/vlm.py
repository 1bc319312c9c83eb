"""Image + chat records in MiniMind-V's formats, and how they become VLM training batches.

Two file formats, one record shape (`{"messages": [...], "images": [bytes, ...], "where": "file:row"}`):

``.parquet`` (MiniMind-V): columns ``conversations`` (the message list as a JSON *string*) and
    ``image_bytes`` (the encoded image file, or a list of them for several images).
``.jsonl``: ``{"conversations": [...], "image": "a.jpg"}``; several images comma-separated
    (``"a.jpg,b.jpg"``), paths relative to ``image_dir`` (default: the jsonl file's folder).

Each ``<image>`` in the user text stands for one image, in order. A record whose placeholder count
differs from its image count, or whose image is missing or unreadable, stops with its file, row
(parquet, 1-based) or line (jsonl) and image name; with ``skip_bad_lines`` it is skipped and counted.

Encoding: the chat template renders the messages (``<image>`` is one special token), then every
``<image>`` id is repeated ``n_image_tokens`` times, once per patch feature the VLM will splice in.
Labels are the assistant tokens (the template's generation marks); everything else, image tokens
included, is -100:

    <|im_start|>user\\n <image> x N \\nWhat colour is the circle?<|im_end|>\\n<|im_start|>assistant\\n red<|im_end|>
    -100 ...                                                                                     red <|im_end|>
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loguru import logger
from PIL import Image

from dataset.chat_template import IMAGE
from dataset.jsonl import DataError, LoadReport, normalise_record, skip_or_raise


def _image_count(messages: list[dict]) -> int:
    return sum(m["content"].count(IMAGE) for m in messages if isinstance(m.get("content"), str))


def _check_images(path: Path, where: int, unit: str, messages: list[dict], images: list[tuple[str, bytes]]) -> None:
    """Raise DataError unless there is one decodable image per `<image>` placeholder."""
    wanted = _image_count(messages)
    if wanted != len(images):
        raise DataError(path, where, "conversations", f"{wanted} <image> placeholder(s) but {len(images)} image(s)"
                        f" ({unit} {where}); put one <image> in the user text per image")
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # header + structure check without decoding every pixel
        except Exception as err:  # PIL raises many types for a broken file
            raise DataError(path, where, "image", f"image {name!r} is not a readable image ({err})") from None


def _parquet_records(path: Path) -> Iterator[tuple[int, dict | None, Any]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = set(table.schema_arrow.names)
    missing = {"conversations", "image_bytes"} - columns
    if missing:
        raise DataError(path, None, None, f"missing column(s) {sorted(missing)}; MiniMind-V parquet has "
                                          f"'conversations' (JSON string) and 'image_bytes'")
    row = 0
    for batch in table.iter_batches(batch_size=512, columns=["conversations", "image_bytes"]):
        for conv, data in zip(batch.column("conversations").to_pylist(), batch.column("image_bytes").to_pylist()):
            row += 1
            blobs = data if isinstance(data, list) else [data]
            images = [(f"image_bytes[{i}]", b) for i, b in enumerate(blobs) if b is not None]
            try:
                obj = {"conversations": json.loads(conv) if isinstance(conv, str) else conv}
            except json.JSONDecodeError as err:
                yield row, None, DataError(path, row, "conversations", f"not valid JSON ({err.msg}) (row {row})")
                continue
            yield row, obj, images


def _jsonl_records(path: Path, image_dir: Path) -> Iterator[tuple[int, dict | None, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield lineno, None, DataError(path, lineno, None, f"invalid JSON line ({err})")
                continue
            names = [n.strip() for n in str(obj.get("image") or "").split(",") if n.strip()]
            missing = [n for n in names if not (image_dir / n).is_file()]
            if missing:
                yield lineno, None, DataError(path, lineno, "image", f"image {missing[0]!r} not found under {image_dir}")
                continue
            yield lineno, obj, [(n, (image_dir / n).read_bytes()) for n in names]


def iter_vlm_records(path: str | Path, image_dir: str | Path | None = None, *, skip_bad_lines: bool = False,
                     report: LoadReport | None = None) -> Iterator[dict]:
    """Validated records from a MiniMind-V parquet or jsonl file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found" if not path.exists() else "not a file")
    report = report if report is not None else LoadReport()
    parquet = path.suffix == ".parquet"
    unit = "row" if parquet else "line"
    source = _parquet_records(path) if parquet else _jsonl_records(path, Path(image_dir) if image_dir else path.parent)
    for where, obj, images in source:  # obj None: `images` is the DataError for that row/line
        try:
            if obj is None:
                raise images
            try:
                messages = normalise_record(obj, "chat")["messages"]
            except DataError as err:  # located as "<record>": give it this file and row/line
                raise DataError(path, where, err.field, err.reason) from None
            _check_images(path, where, unit, messages, images)
        except DataError as err:
            _skip_or_raise(err, skip_bad_lines, report)
            continue
        report.records += 1
        yield {"messages": messages, "images": [data for _, data in images], "where": f"{path}:{where}"}
    if report.skipped:
        logger.warning(f"{path}: skipped {report.skipped} bad {unit}(s); first: "
                       + "; ".join(str(e) for e in report.errors))
    if report.records == 0:
        raise DataError(path, None, None, "no valid records")


def _skip_or_raise(err: DataError, skip: bool, report: LoadReport) -> None:
    skip_or_raise(err, skip and err.line is not None, report)  # a whole-file problem cannot be skipped


def load_vlm_records(path: str | Path, image_dir: str | Path | None = None, skip_bad_lines: bool = False) -> list[dict]:
    return list(iter_vlm_records(path, image_dir, skip_bad_lines=skip_bad_lines))


def expand_image_tokens(ids: Sequence[int], image_token_id: int, n_image_tokens: int) -> list[int]:
    """Repeat every `<image>` id n_image_tokens times: one slot per patch feature."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * n_image_tokens if i == image_token_id else [i])
    return out


def encode_vlm(tokenizer: Any, messages: list[dict], image_token_id: int, n_image_tokens: int,
               add_generation_prompt: bool = False) -> dict[str, list[int]]:
    """{"input_ids", "labels"}: the chat-templated conversation with `<image>` expanded; labels are
    the assistant tokens, -100 elsewhere (prompt, template, image tokens). With
    `add_generation_prompt` (for generation) the last turn must be the user's and labels are all -100."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=not add_generation_prompt,
                                        add_generation_prompt=add_generation_prompt)
    ids = list(enc["input_ids"])
    mask = list(enc.get("assistant_masks") or [0] * len(ids))
    input_ids, labels = [], []
    for tok, is_answer in zip(ids, mask):
        if tok == image_token_id:
            input_ids.extend([tok] * n_image_tokens)
            labels.extend([-100] * n_image_tokens)
        else:
            input_ids.append(tok)
            labels.append(tok if is_answer else -100)
    return {"input_ids": input_ids, "labels": labels}
