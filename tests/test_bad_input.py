"""Bad input, everywhere a user gives it, as one table: each case runs a stage (or script) through its real
entry point (`run_main`) and must exit 2 with one error line naming the file, the line and the field
where there is one, without a traceback, and without changing or removing anything already in out_dir."""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_script
from dataset.chat_template import IMAGE
from trainer import (train_0_tokenizer, train_1_pretrain, train_2_sft, train_3_dpo, train_4_grpo, train_5_reward,
                     train_6_ppo, train_7_vlm)
from trainer.lib.runtime import run_main

pytestmark = pytest.mark.usefixtures("plumb_single_thread")


def user(text: str = "What is 2 + 3?") -> dict:
    return {"role": "user", "content": text}


def assistant(text: str = "5") -> dict:
    return {"role": "assistant", "content": text}


GOOD = {
    "pretrain": {"text": "Tom has a red ball."},
    "chat": {"conversations": [user(), assistant()]},
    "dpo": {"chosen": [user(), assistant("5")], "rejected": [user(), assistant("6")]},
    "rl": {"conversations": [user(), assistant("")], "gt": "5"},
}


def lines(*records) -> str:
    """A jsonl body: dicts are dumped, strings written as they are (a broken line)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def vlm_jsonl(root: Path, image: str) -> str:
    (root / "ok.png").write_bytes(png())
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    conv = [user(f"{IMAGE}\nWhat colour is it?"), assistant("red")]
    return lines({"conversations": conv, "image": "ok.png"}, {"conversations": conv, "image": image})


@dataclass
class Case:
    id: str
    stage: object            # a stage module (or a script module) with main(argv)
    argv: Callable[[Path, Path, dict], list[str]]   # (out_dir, bad_file, rl_models) -> flags
    body: str | Callable[[Path], str] | None          # the bad file's text; None: no file is written
    words: tuple[str, ...]   # all must appear in the error line ({bad} = the bad file's path)
    suffix: str = ".jsonl"
    tail: tuple[str, ...] = ("--max_steps", "1", "--device", "cpu")  # never train long if a check is missing


def data(*extra: str):
    return lambda out, bad, m: ["--data", str(bad), *extra]


SFT_INIT = ("--init_from", "pretrain")
CASES = [
    Case("missing file", train_2_sft, data(*SFT_INIT), None, ("{bad}", "no such file")),
    Case("empty file", train_2_sft, data(*SFT_INIT), "", ("{bad}", "empty")),
    Case("bad JSON line", train_2_sft, data(*SFT_INIT), lines(GOOD["chat"], '{"conversations": [', GOOD["chat"]),
         ("{bad}:2", "invalid JSON")),
    Case("wrong type", train_2_sft, data(*SFT_INIT), lines(GOOD["chat"], {"conversations": "hello"}),
         ("{bad}:2", "field 'conversations'", "expected a list")),
    Case("content not a string", train_2_sft, data(*SFT_INIT), lines({"conversations": [user(), {"role": "assistant", "content": 5}]}),
         ("{bad}:1", "field 'conversations[1].content'", "expected str")),
    Case("unknown role", train_2_sft, data(*SFT_INIT), lines(GOOD["chat"], {"conversations": [{"role": "bot", "content": "hi"}]}),
         ("{bad}:2", "field 'conversations[0].role'", "unknown role 'bot'")),
    Case("no assistant turn", train_2_sft, data(*SFT_INIT), lines(GOOD["chat"], {"conversations": [user()]}),
         ("{bad}:2", "field 'conversations'", "assistant")),
    Case("over-long samples", train_2_sft, data(*SFT_INIT, "--max_length", "16"),
         lines(*[{"conversations": [user("why " * 40), assistant()]}] * 4),
         ("{bad}", "--max_length 16", "no assistant token")),
    Case("pretrain text not a string", train_1_pretrain, data(), lines(GOOD["pretrain"], {"text": 5}),
         ("{bad}:2", "field 'text'", "expected str")),
    Case("tokenizer corpus missing", train_0_tokenizer, data(), None, ("{bad}", "no such file"), tail=()),
    Case("dpo prompts differ", train_3_dpo, data("--init_from", "{policy}"),
         lines({"chosen": [user("a"), assistant()], "rejected": [user("b"), assistant()]}),
         ("{bad}:1", "field 'rejected[0]'", "same prompt")),
    Case("dpo last turn not assistant", train_5_reward, data("--init_from", "{policy}"),
         lines({"chosen": [user(), assistant(), user()], "rejected": [user(), assistant(), user()]}),
         ("{bad}:1", "field 'chosen[2].role'", "'assistant'")),
    Case("rl prompt without gt (correctness)", train_4_grpo, data("--init_from", "{policy}"),
         lines(GOOD["rl"], {"conversations": [user(), assistant("")]}),
         ("{bad}:2", "field 'gt'", "correctness")),
    Case("rl prompt without gt (ppo rule)", train_6_ppo,
         data("--init_from", "{policy}", "--reward_model", "{reward}", "--rule_reward", "correctness"),
         lines(GOOD["rl"], {"conversations": [user(), assistant("")], "gt": []}),
         ("{bad}:2", "field 'gt'", "correctness")),
    Case("missing image", train_7_vlm, data("--init_from", "pretrain"), lambda root: vlm_jsonl(root, "gone.png"),
         ("{bad}:2", "field 'image'", "'gone.png' not found")),
    Case("corrupt image", train_7_vlm, data("--init_from", "pretrain"), lambda root: vlm_jsonl(root, "broken.png"),
         ("{bad}:2", "field 'image'", "'broken.png'", "not a readable")),
    Case("init_from not a checkpoint", train_2_sft, lambda out, bad, m: ["--init_from", str(out / "tokenizer")], None,
         ("tokenizer", "not a model checkpoint")),
    Case("init_from no such dir", train_3_dpo, lambda out, bad, m: ["--init_from", str(out / "nowhere")], None,
         ("nowhere", "neither a stage name", "nor an existing path")),
    Case("reward model where a causal LM is expected", train_3_dpo, lambda out, bad, m: ["--init_from", str(m["reward"])],
         None, ("reward", "sequence classifier", "causal")),
    Case("causal LM where a reward model is expected", train_6_ppo,
         lambda out, bad, m: ["--init_from", str(m["policy"]), "--reward_model", str(m["policy"])], None,
         ("policy", "causal", "reward model")),
    Case("tokenizer larger than the model's vocabulary", train_2_sft, lambda out, bad, m: ["--init_from", str(out / "mismatch")],
         None, ("mismatch", "vocab_size", "tokenizer")),
    Case("evaluate: not a checkpoint", load_script("evaluate"),
         lambda out, bad, m: ["--out_dir", str(out), "--task", "answer_acc", "--stage", str(out / "tokenizer")], None,
         ("tokenizer", "not a model checkpoint"), tail=()),
    Case("evaluate: bad held-out line", load_script("evaluate"),
         lambda out, bad, m: ["--out_dir", str(out), "--task", "answer_acc", "--stage", "sft", "--data", str(bad)],
         lines(GOOD["chat"], "not json"), ("{bad}:2", "invalid JSON"), tail=()),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bad_out(stage_copy, rl_models):
    """stage_copy plus what earlier runs of every stage would have left: a complete checkpoint per stage,
    and a checkpoint whose tokenizer has more tokens than the model's embedding (``mismatch``)."""
    import shutil

    from transformers import AutoTokenizer

    from trainer.lib.stages import mark_complete

    for stage in ("sft", "dpo", "grpo", "ppo", "vlm"):
        shutil.copytree(stage_copy / "pretrain" / "checkpoint-1", stage_copy / stage / "checkpoint-1")
    shutil.copytree(rl_models["reward"], stage_copy / "reward" / "checkpoint-1")
    mark_complete(stage_copy / "reward" / "checkpoint-1")
    small = stage_copy / "pretrain" / "checkpoint-1"
    shutil.copytree(small, stage_copy / "mismatch")
    tok = AutoTokenizer.from_pretrained(small)
    tok.add_tokens([f"<extra_{i}>" for i in range(600)])
    tok.save_pretrained(stage_copy / "mismatch")
    return stage_copy


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_loses_nothing(case, bad_out, rl_models, tmp_path, capsys):
    files = tmp_path / "input"
    files.mkdir()
    bad = files / f"bad{case.suffix}"
    if case.body is not None:
        bad.write_text(case.body(files) if callable(case.body) else case.body)
    models = {"policy": rl_models["policy"], "reward": rl_models["reward"]}
    argv = [a.format(**{k: str(v) for k, v in models.items()}) for a in case.argv(bad_out, bad, models)]
    if "--out_dir" not in argv:
        argv = ["--out_dir", str(bad_out), *argv]
    before = snapshot(bad_out)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda _: case.stage.main([*argv, *case.tail]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "| ERROR" in line]
    assert exit_.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(errors) == 1, err[-2000:]
    for word in case.words:
        assert word.format(bad=bad) in errors[0], errors[0]
    after = snapshot(bad_out)
    assert {k: v for k, v in after.items() if k in before} == before, "a file written before changed or vanished"
