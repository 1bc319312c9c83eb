"""MiniMind jsonl loading: normalised shapes, file:line:field errors, skipping, and real files."""

import json
from pathlib import Path

import pytest
from loguru import logger

from dataset.jsonl import DataError, LoadReport, find_default_file, iter_records, load_records, normalise_record


def _write(tmp_path: Path, lines: list, name: str = "x.jsonl") -> Path:
    path = tmp_path / name
    data = b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
                    for x in lines)
    path.write_bytes(data)
    return path


def _chat(*pairs, **extra) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in pairs], **extra}


U, A = "user", "assistant"
GOOD_CHAT = _chat((U, "hi"), (A, "hello"))


BAD_CASES = [
    ("pretrain", ['{"text": "a"}', '{"text": '], 2, None, "invalid JSON"),
    ("pretrain", ['{"text": "a"}', "[1, 2]"], 2, None, "expected a JSON object, got list"),
    ("pretrain", [{"txt": "a"}], 1, "text", "missing"),
    ("pretrain", [{"text": 5}], 1, "text", "expected str, got int"),
    ("pretrain", [{"text": "a"}, {"text": "   "}], 2, "text", "empty text"),
    ("chat", [GOOD_CHAT, {"messages": []}], 2, "conversations", "missing"),
    ("chat", [{"conversations": "hi"}], 1, "conversations", "expected a list of messages, got str"),
    ("chat", [{"conversations": []}], 1, "conversations", "empty list"),
    ("chat", [{"conversations": ["hi"]}], 1, "conversations[0]", "expected an object"),
    ("chat", [_chat((U, "q"), (A, None))], 1, "conversations[1].content", "expected str, got null"),
    ("chat", [{"conversations": [{"content": "q"}]}], 1, "conversations[0].role", "missing"),
    ("chat", [{"conversations": [{"role": "user"}]}], 1, "conversations[0].content", "missing"),
    ("chat", [_chat((U, "q"), ("bot", "a"))], 1, "conversations[1].role", "unknown role 'bot'"),
    ("chat", [{"conversations": [{"role": "system", "content": "s", "tools": "[{bad"}, {"role": U, "content": "q"}]}],
     1, "conversations[0].tools", "not valid JSON"),
    ("chat", [{"conversations": [{"role": A, "content": "", "tool_calls": "{oops"}]}],
     1, "conversations[0].tool_calls", "not valid JSON"),
    ("chat", [{"conversations": [{"role": A, "content": "", "tool_calls": "42"}]}],
     1, "conversations[0].tool_calls", "expected a list or object, got int"),
    ("chat", [_chat((U, "q"), (A, "a"), tools="nope")], 1, "tools", "not valid JSON"),
    ("chat", [{"conversations": [{"role": A, "content": "a", "reasoning_content": 3}]}],
     1, "conversations[0].reasoning_content", "expected str"),
    ("dpo", [{"chosen": GOOD_CHAT["conversations"]}], 1, "rejected", "missing"),
    ("dpo", [{"chosen": [{"role": U, "content": "q"}], "rejected": [{"role": U, "content": "q"}]}],
     1, "chosen[0].role", "must be 'assistant'"),
    ("dpo", [{"chosen": [{"role": U, "content": "q1"}, {"role": A, "content": "a"}],
              "rejected": [{"role": U, "content": "q2"}, {"role": A, "content": "b"}]}],
     1, "rejected[0]", "share the same prompt turns"),
    ("dpo", [{"chosen": [{"role": U, "content": "q"}, {"role": A, "content": "a"}],
              "rejected": [{"role": U, "content": "q"}, {"role": A, "content": "x"}, {"role": U, "content": "q"},
                           {"role": A, "content": "b"}]}],
     1, "rejected[1]", "share the same prompt turns"),
    ("rl", [{"conversations": [{"role": A, "content": ""}]}], 1, "conversations", "no prompt turns"),
    ("rl", [{**_chat((U, "q"), (A, "")), "gt": {"a": 1}}], 1, "gt", "expected a list of str"),
    ("rl", [{**_chat((U, "q"), (A, "")), "gt": ["1", None]}], 1, "gt[1]", "expected str or number, got null"),
]


@pytest.mark.parametrize("kind, lines, line, field, reason", BAD_CASES)
def test_malformed_line_raises_with_file_line_field(tmp_path, kind, lines, line, field, reason):
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert reason in err.reason
    assert str(err).startswith(f"{path}:{line}: ")
    if field is not None:
        assert f"field '{field}'" in str(err)


def test_error_message_format():
    err = DataError("data/x.jsonl", 17, "conversations[1].role",
                    "unknown role 'bot' (expected system, user, assistant, tool)")
    assert str(err) == ("data/x.jsonl:17: field 'conversations[1].role': unknown role 'bot' "
                        "(expected system, user, assistant, tool)")
    assert isinstance(err, ValueError)
    assert str(DataError("a.jsonl", None, None, "no records")) == "a.jsonl: no records"


def test_unknown_role_message_is_exact(tmp_path):
    path = _write(tmp_path, [GOOD_CHAT, _chat((U, "q"), ("bot", "a"))])
    with pytest.raises(DataError) as info:
        load_records(path, "chat")
    assert str(info.value) == (f"{path}:2: field 'conversations[1].role': unknown role 'bot' "
                               "(expected system, user, assistant, tool)")


def test_non_utf8_names_the_line(tmp_path):
    path = _write(tmp_path, [{"text": "a"}, "", b'{"text": "caf\xe9"}'])
    with pytest.raises(DataError) as info:
        load_records(path, "pretrain")
    assert info.value.line == 3 and "not UTF-8" in info.value.reason


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_empty_file_has_no_records(tmp_path, lines):
    path = _write(tmp_path, lines) if lines else tmp_path / "x.jsonl"
    if not lines:
        path.write_bytes(b"")
    with pytest.raises(DataError, match="no records") as info:
        load_records(path, "pretrain")
    assert info.value.line is None


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="file not found") as info:
        load_records(tmp_path / "nope.jsonl", "chat")
    assert info.value.path == str(tmp_path / "nope.jsonl")


def test_unknown_kind_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records(_write(tmp_path, [{"text": "a"}]), "sft")


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = _write(tmp_path, [{"text": "a"}, "", "  ", {"text": "b"}, "", {"text": 1}])
    with pytest.raises(DataError) as info:
        load_records(path, "pretrain")
    assert info.value.line == 6
    assert load_records(path, "pretrain", limit=2) == [{"text": "a"}, {"text": "b"}]


def test_skip_bad_lines_counts_and_warns(tmp_path):
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        path = _write(tmp_path, [{"text": "a"}, "{bad", {"text": 3}, {"text": "b"}, b"\xff\xfe"])
        report = LoadReport()
        records = load_records(path, "pretrain", skip_bad_lines=True, report=report)
    finally:
        logger.remove(sink)
    assert records == [{"text": "a"}, {"text": "b"}]
    assert (report.records, report.skipped) == (2, 3)
    assert [e.line for e in report.errors] == [2, 3, 5]
    assert len(messages) == 1
    assert "skipped 3 bad line(s) of 5" in messages[0] and f"{path}:2:" in messages[0]


def test_skip_bad_lines_with_nothing_valid_still_fails(tmp_path):
    with pytest.raises(DataError, match=r"no valid records \(2 bad lines skipped\)"):
        load_records(_write(tmp_path, ["{", "[]"]), "pretrain", skip_bad_lines=True)


def test_chat_normalised_with_extras_and_tool_strings_parsed(tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    calls = [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    record = {
        "id": 7,
        "conversations": [
            {"role": "system", "content": "s", "tools": json.dumps(tools)},
            {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": "", "reasoning_content": "add them", "tool_calls": json.dumps(calls)},
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "assistant", "content": "3"},
        ],
        "tools": json.dumps(tools),
    }
    (out,) = load_records(_write(tmp_path, [record]), "chat")
    assert out["id"] == 7 and out["tools"] == tools and "conversations" not in out
    msgs = out["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant", "assistant"]
    assert msgs[0]["tools"] == tools
    assert msgs[2]["tool_calls"] == calls and msgs[2]["reasoning_content"] == "add them"
    assert msgs[4]["content"] == "" and msgs[4]["tool_calls"] == calls


def test_dpo_becomes_trl_conversational_preference(tmp_path):
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    line = {"chosen": prompt + [{"role": "assistant", "content": "good"}],
            "rejected": prompt + [{"role": "assistant", "content": "bad"}]}
    (out,) = load_records(_write(tmp_path, [line]), "dpo")
    assert out == {"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
                   "rejected": [{"role": "assistant", "content": "bad"}]}


@pytest.mark.parametrize("gt, expected", [(None, []), ("72", ["72"]), (72, ["72"]), (["1", 2], ["1", "2"])])
def test_rl_drops_placeholder_and_normalises_gt(tmp_path, gt, expected):
    line = _chat((U, "q"), (A, ""))
    if gt is not None:
        line["gt"] = gt
    (out,) = load_records(_write(tmp_path, [line]), "rl")
    assert out == {"prompt": [{"role": "user", "content": "q"}], "gt": expected}


def test_rl_keeps_nonempty_trailing_answer_as_reference_not_gt(tmp_path):
    (out,) = load_records(_write(tmp_path, [_chat((U, "q"), (A, "it is 5"))]), "rl")
    assert out == {"prompt": [{"role": "user", "content": "q"}], "gt": [], "reference": "it is 5"}
    (out,) = load_records(_write(tmp_path, [_chat((U, "q"))], "y.jsonl"), "rl")
    assert out == {"prompt": [{"role": "user", "content": "q"}], "gt": []}


def test_iter_records_is_lazy_and_limit_stops_early(tmp_path):
    path = _write(tmp_path, [{"text": "a"}, {"text": "b"}, "{broken"])
    it = iter_records(path, "pretrain")
    assert next(it) == {"text": "a"}
    assert load_records(path, "pretrain", limit=2) == [{"text": "a"}, {"text": "b"}]


def test_normalise_record_in_memory():
    assert normalise_record({"text": "x"}, "pretrain") == {"text": "x"}
    with pytest.raises(DataError, match="<record>: field 'text'"):
        normalise_record({"text": ""}, "pretrain")


def test_find_default_file_prefers_minimind_order(tmp_path):
    assert find_default_file("sft", tmp_path) is None
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "sft_mini_512.jsonl").write_text("{}\n")
    assert find_default_file("sft", tmp_path) == tmp_path / "dataset" / "sft_mini_512.jsonl"
    (tmp_path / "dataset" / "sft_t2t_mini.jsonl").write_text("{}\n")
    assert find_default_file("sft", tmp_path) == tmp_path / "dataset" / "sft_t2t_mini.jsonl"
    with pytest.raises(ValueError):
        find_default_file("chat", tmp_path)
    # The reward model reads MiniMind's DPO pairs unless a reward.jsonl of its own is there.
    assert find_default_file("reward", tmp_path) is None
    (tmp_path / "dataset" / "dpo.jsonl").write_text("{}\n")
    assert find_default_file("reward", tmp_path) == tmp_path / "dataset" / "dpo.jsonl"
    (tmp_path / "dataset" / "reward.jsonl").write_text("{}\n")
    assert find_default_file("reward", tmp_path) == tmp_path / "dataset" / "reward.jsonl"


@pytest.mark.parametrize("name, kind", [("pretrain_train", "pretrain"), ("sft_eval", "chat"),
                                        ("dpo_train", "dpo"), ("reward_eval", "dpo"), ("rl_eval", "rl")])
def test_loaders_read_demo_data(data_demo_dir, name, kind):
    records = load_records(data_demo_dir[name], kind)
    n_lines = sum(1 for _ in data_demo_dir[name].open())
    assert len(records) == n_lines > 100
    if kind == "rl":
        assert all(r["prompt"][-1]["role"] == "user" and len(r["gt"]) == 1 and r["gt"][0].isdigit()
                   for r in records)  # the default RL skill is a chain of sums: the answer is a number
    if kind == "dpo":
        assert all(r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user" for r in records)


REAL = [
    ("pretrain_tinystories.jsonl", "pretrain", None, 2000),
    ("sft_gsm8k.jsonl", "chat", 300, 300),
    ("dpo_hh_harmless.jsonl", "dpo", None, 1841),
    ("dpo_llamafactory_en.jsonl", "dpo", None, 250),
    ("rlaif_gsm8k.jsonl", "rl", 500, 500),
]


@pytest.mark.parametrize("name, kind, limit, expected", REAL)
def test_loaders_read_real_data(data_shared_dir, name, kind, limit, expected):
    path = data_shared_dir / name
    if not path.is_file():
        pytest.skip(f"{path} absent")
    report = LoadReport()
    records = load_records(path, kind, limit=limit, report=report)
    assert len(records) == expected and report.skipped == 0
    if kind == "pretrain":
        assert records[0]["text"].startswith("One day, a little girl named Lily")
    elif kind == "chat":
        assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
        assert records[0]["messages"][1]["content"].endswith("#### 72")
    elif kind == "dpo":
        for r in records:
            assert r["prompt"] and r["prompt"][-1]["role"] == "user"
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        if "llamafactory" in name:
            assert sum(r["prompt"][0]["role"] == "system" for r in records) == 68
    else:
        assert records[0]["gt"] == ["72"] and records[0]["prompt"][0]["content"].startswith("Natalia")
        assert all(len(r["prompt"]) == 1 and "reference" not in r for r in records)
