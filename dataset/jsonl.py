"""Read MiniMind's jsonl formats as they are, and fail loudly with file:line:field when they are not.

Every MiniMind data file is UTF-8 text, one JSON object per line. Four record kinds exist, and
this module turns each into the shape the trl trainers expect (trl's *conversational* formats):

``kind="pretrain"``  line ``{"text": str}``
    -> ``{"text": str}`` (non-empty).

``kind="chat"``  line ``{"conversations": [message, ...], ...}``
    -> ``{"messages": [message, ...], ...}``; other top-level keys are kept as they are. At least one
    turn must be the assistant's (the reply SFT learns).

``kind="dpo"``  line ``{"chosen": [message, ...], "rejected": [message, ...]}``
    -> ``{"prompt": [message, ...], "chosen": [message], "rejected": [message]}``.
    Both lists must end with an assistant turn and share the same turns before it; ``prompt``
    is those shared turns, ``chosen``/``rejected`` the one final assistant message each.

``kind="rl"``  line ``{"conversations": [..., {"role": "assistant", "content": ""}], "gt"?: ...}``
    -> ``{"prompt": [message, ...], "gt": [str, ...], "reference"?: str}``.
    A trailing assistant turn is MiniMind's rollout placeholder and is dropped. ``gt`` (the
    verifiable answer) may be a list of strings, a string or a number and always comes out as
    ``list[str]`` (``[]`` when absent). A *non-empty* trailing assistant turn is kept as
    ``reference``; it is never used as ``gt``.

``required={"gt": why}`` makes a field mandatory (non-empty) in the normalised record: a line without
it is a bad line like any other, its message says ``why`` (a rule reward that grades against ``gt``).

A ``message`` is ``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` plus, when
present, ``reasoning_content`` (str), ``tool_calls`` and ``tools``. MiniMind stores the last two
either as JSON values or as JSON *strings*; strings are parsed here so downstream code sees only
Python lists/dicts. A top-level ``tools`` key (chat files) is parsed the same way.

Errors are :class:`DataError` (a ``ValueError``) whose message reads like a compiler's::

    data/x.jsonl:17: field 'conversations[1].role': unknown role 'bot' (expected system, user, assistant, tool)

Blank lines are skipped. With ``skip_bad_lines=True`` a bad line is skipped instead of raised; the
count and the first few reasons are logged as a warning and, if you pass a :class:`LoadReport`,
recorded there::

    report = LoadReport()
    records = load_records("dataset/sft_mini_512.jsonl", "chat", skip_bad_lines=True, report=report)
    print(report.skipped, report.errors[:3])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

KINDS = ("pretrain", "chat", "dpo", "rl")
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 5

DEFAULT_FILES: dict[str, list[str]] = {
    "pretrain": ["pretrain_t2t_mini.jsonl", "pretrain_hq.jsonl"],
    "sft": ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl"],
    "dpo": ["dpo.jsonl"],
    # The reward model's comparisons: a file of its own if you have one, else the DPO pairs (MiniMind).
    "reward": ["reward.jsonl", "dpo.jsonl"],
    "rl": ["rlaif.jsonl", "rlaif-mini.jsonl"],
}
"""MiniMind's own file names per stage, looked up under ``<repo_root>/dataset/`` in this order."""


class DataError(ValueError):
    """A data file that does not match its format.

    ``path`` is the file, ``line`` the 1-based line number (``None`` for whole-file problems),
    ``field`` a path into the record such as ``"conversations[1].role"`` (or ``None``), and
    ``reason`` what is wrong.
    """

    def __init__(self, path: str | Path, line: int | None, field: str | None, reason: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.field is not None:
            return f"{where}: field '{self.field}': {self.reason}"
        return f"{where}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.field, self.reason))


@dataclass
class LoadReport:
    """Filled in by :func:`iter_records` / :func:`load_records` when passed as ``report=``.

    ``records`` counts records returned, ``skipped`` bad lines skipped (only with
    ``skip_bad_lines=True``), ``errors`` the first :data:`MAX_REPORTED_ERRORS` of those.
    """

    records: int = 0
    skipped: int = 0
    errors: list[DataError] = field(default_factory=list)


class _FieldError(Exception):
    """Raised by the validators; turned into a DataError once the line number is known."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_json_field(value: Any, where: str) -> Any:
    """``tools`` / ``tool_calls`` arrive either as JSON values or as JSON strings."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _FieldError(where, f"not valid JSON ({err.msg} at char {err.pos}): {_short(value)}") from None
    if not isinstance(value, (list, dict)):
        raise _FieldError(where, f"expected a list or object, got {_type_name(value)}")
    return value


def _check_message(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _FieldError(where, f"expected an object with 'role' and 'content', got {_type_name(raw)}")
    if "role" not in raw:
        raise _FieldError(f"{where}.role", "missing")
    role = raw["role"]
    if not isinstance(role, str):
        raise _FieldError(f"{where}.role", f"expected str, got {_type_name(role)}")
    if role not in ROLES:
        raise _FieldError(f"{where}.role", f"unknown role {role!r} (expected {', '.join(ROLES)})")
    message = dict(raw)
    if "tool_calls" in message and message["tool_calls"] is not None:
        message["tool_calls"] = _parse_json_field(message["tool_calls"], f"{where}.tool_calls")
    if "tools" in message and message["tools"] is not None:
        message["tools"] = _parse_json_field(message["tools"], f"{where}.tools")
    if "content" not in message:
        raise _FieldError(f"{where}.content", "missing")
    content = message["content"]
    if content is None and message.get("tool_calls"):
        message["content"] = ""
    elif not isinstance(content, str):
        raise _FieldError(f"{where}.content", f"expected str, got {_type_name(content)}")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise _FieldError(f"{where}.reasoning_content", f"expected str, got {_type_name(reasoning)}")
    return message


def _check_messages(obj: dict, key: str) -> list[dict]:
    if key not in obj:
        raise _FieldError(key, "missing")
    value = obj[key]
    if not isinstance(value, list):
        raise _FieldError(key, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _FieldError(key, "empty list of messages")
    return [_check_message(m, f"{key}[{i}]") for i, m in enumerate(value)]


def _normalise_pretrain(obj: dict) -> dict:
    if "text" not in obj:
        raise _FieldError("text", "missing")
    text = obj["text"]
    if not isinstance(text, str):
        raise _FieldError("text", f"expected str, got {_type_name(text)}")
    if not text.strip():
        raise _FieldError("text", "empty text")
    return {"text": text}


def _normalise_chat(obj: dict) -> dict:
    messages = _check_messages(obj, "conversations")
    if not any(m["role"] == "assistant" for m in messages):
        raise _FieldError("conversations", "no 'assistant' turn: a chat record needs at least one reply to learn")
    out = {k: v for k, v in obj.items() if k != "conversations"}
    if out.get("tools") is not None:
        out["tools"] = _parse_json_field(out["tools"], "tools")
    return {"messages": messages, **out}


def _normalise_dpo(obj: dict) -> dict:
    chosen = _check_messages(obj, "chosen")
    rejected = _check_messages(obj, "rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        last = len(msgs) - 1
        if msgs[-1]["role"] != "assistant":
            raise _FieldError(
                f"{key}[{last}].role", f"the last turn must be 'assistant', got {msgs[-1]['role']!r}"
            )
    if chosen[:-1] != rejected[:-1]:
        n = min(len(chosen), len(rejected)) - 1
        first = next((i for i in range(n) if chosen[i] != rejected[i]), n)
        raise _FieldError(
            f"rejected[{first}]",
            f"chosen and rejected must share the same prompt turns; they differ at turn {first} "
            f"({len(chosen) - 1} vs {len(rejected) - 1} prompt turns)",
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _normalise_gt(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        raise _FieldError("gt", "expected a list of str, a str or a number, got bool")
    if isinstance(value, (str, int, float)):
        return [str(value)]
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise _FieldError(f"gt[{i}]", f"expected str or number, got {_type_name(item)}")
            out.append(str(item))
        return out
    raise _FieldError("gt", f"expected a list of str, a str or a number, got {_type_name(value)}")


def _normalise_rl(obj: dict) -> dict:
    messages = _check_messages(obj, "conversations")
    reference = None
    if messages[-1]["role"] == "assistant":
        reference = messages[-1]["content"].strip() or None
        messages = messages[:-1]
    if not messages:
        raise _FieldError("conversations", "no prompt turns before the assistant placeholder")
    out: dict[str, Any] = {"prompt": messages, "gt": _normalise_gt(obj.get("gt"))}
    if reference is not None:
        out["reference"] = reference
    return out


_NORMALISERS = {
    "pretrain": _normalise_pretrain,
    "chat": _normalise_chat,
    "dpo": _normalise_dpo,
    "rl": _normalise_rl,
}


def normalise_record(obj: Any, kind: str) -> dict:
    """Validate and normalise one already-parsed record (e.g. built in memory) of ``kind``.

    Raises :class:`DataError` with path ``"<record>"`` and no line number.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (expected one of {', '.join(KINDS)})")
    try:
        if not isinstance(obj, dict):
            raise _FieldError(None, f"expected a JSON object, got {_type_name(obj)}")
        return _NORMALISERS[kind](obj)
    except _FieldError as err:
        raise DataError("<record>", None, err.field, err.reason) from None


def _parse(line: str, kind: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise _FieldError(None, f"invalid JSON: {err.msg} (char {err.pos})") from None
    if not isinstance(obj, dict):
        raise _FieldError(None, f"expected a JSON object, got {_type_name(obj)}")
    return _NORMALISERS[kind](obj)


def iter_records(
    path: str | Path,
    kind: str,
    *,
    skip_bad_lines: bool = False,
    limit: int | None = None,
    report: LoadReport | None = None,
    required: Mapping[str, str] | None = None,
    warn: bool = True,
) -> Iterator[dict]:
    """Yield normalised records of ``kind`` from the jsonl file at ``path``, one line at a time.

    Constant memory: the file is read line by line as bytes, so a non-UTF-8 line is reported
    with its number. ``limit`` stops after that many records (the rest of the file is not read).
    Raises :class:`DataError` for a missing file, a file with no records, or (unless
    ``skip_bad_lines``) the first bad line. See the module docstring for the output shapes.
    The skipped-lines warning is logged when the generator finishes (end of file or ``limit``),
    unless ``warn=False`` (a second pass over a file whose first pass already warned).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (expected one of {', '.join(KINDS)})")
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found" if not path.exists() else "not a file")
    report = report if report is not None else LoadReport()
    n_nonblank = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and report.records >= limit:
                break
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                n_nonblank += 1
                error = DataError(path, lineno, None, f"not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})")
                skip_or_raise(error, skip_bad_lines, report)
                continue
            if not text.strip():
                continue
            n_nonblank += 1
            try:
                record = _parse(text, kind)
                for key, why in (required or {}).items():
                    if not record.get(key):
                        raise _FieldError(key, f"missing or empty; {why}")
            except _FieldError as err:
                skip_or_raise(DataError(path, lineno, err.field, err.reason), skip_bad_lines, report)
                continue
            report.records += 1
            yield record
    if report.skipped and warn:
        reasons = "; ".join(str(e) for e in report.errors)
        logger.warning(f"{path}: skipped {report.skipped} bad line(s) of {n_nonblank}; first: {reasons}")
    if report.records == 0:
        if n_nonblank == 0:
            raise DataError(path, None, None, "no records (the file is empty)")
        raise DataError(path, None, None, f"no valid records ({report.skipped} bad lines skipped)")


def skip_or_raise(error: DataError, skip: bool, report: LoadReport) -> None:
    """Raise `error`, or (with skip_bad_lines) count it and keep the first few in `report`."""
    if not skip:
        raise error
    report.skipped += 1
    if len(report.errors) < MAX_REPORTED_ERRORS:
        report.errors.append(error)


def load_records(
    path: str | Path,
    kind: str,
    skip_bad_lines: bool = False,
    *,
    limit: int | None = None,
    report: LoadReport | None = None,
    required: Mapping[str, str] | None = None,
) -> list[dict]:
    """All records of :func:`iter_records` as a list (same arguments, same errors)."""
    return list(iter_records(path, kind, skip_bad_lines=skip_bad_lines, limit=limit, report=report, required=required))


def find_default_file(kind: str, repo_root: str | Path) -> Path | None:
    """The first of MiniMind's own files for ``kind`` (a key of :data:`DEFAULT_FILES`) that exists
    under ``<repo_root>/dataset/``, else ``None`` (then the caller falls back to the demo data)."""
    if kind not in DEFAULT_FILES:
        raise ValueError(f"unknown stage {kind!r} (expected one of {', '.join(DEFAULT_FILES)})")
    for name in DEFAULT_FILES[kind]:
        candidate = Path(repo_root) / "dataset" / name
        if candidate.is_file():
            return candidate
    return None
