"""scripts/run_pipeline.py: the whole course end to end (with a few steps per stage), its report card
and plots, --resume, a failing stage and a bad --stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, load_script
from trainer.lib.stages import STAGES, mark_complete, stage_output

# A few steps and a few held-out items per stage: the mechanism, not the outcome.
FAST = {
    "tokenizer": {"max_texts": 3000, "max_eval_texts": 50},
    "pretrain": {"max_steps": 4, "max_eval_blocks": 4, "batch_size": 8, "eval_steps": 1000, "logging_steps": 1},
    "sft": {"max_steps": 4, "max_eval_conversations": 8, "eval_answers": 4, "batch_size": 8, "logging_steps": 1},
    "dpo": {"max_steps": 2, "max_eval_pairs": 8, "eval_answers": 4, "batch_size": 4, "logging_steps": 1},
    "grpo": {"max_steps": 2, "num_generations": 2, "batch_size": 4, "max_completion_length": 8, "max_eval_prompts": 4,
             "logging_steps": 1},
    "reward": {"max_steps": 2, "max_eval_pairs": 8, "batch_size": 4, "logging_steps": 1},
    "ppo": {"max_steps": 2, "batch_size": 4, "samples_per_prompt": 1, "mini_batch_size": 2, "max_completion_length": 8,
            "max_eval_prompts": 4, "logging_steps": 1},
    "vlm": {"max_steps": 2, "eval_answers": 4, "max_eval_records": 8, "batch_size": 4, "logging_steps": 1},
}


def pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/run_pipeline.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("course")
    config = out / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    proc = pipeline("--out_dir", str(out), "--config", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_every_stage_leaves_a_checkpoint_and_its_time(course):
    state = json.loads((course / "pipeline.json").read_text())
    for stage in STAGES:
        assert stage_output(course, stage) is not None, stage
        assert state["stages"][stage]["status"] == "done" and state["stages"][stage]["seconds"] > 0


def test_report_json_has_every_stage_with_numbers(course):
    report = json.loads((course / "report.json").read_text())
    assert list(report["stages"]) == list(STAGES)
    for stage, entry in report["stages"].items():
        assert entry["seconds"] > 0, stage
        assert entry["metrics"], stage
        for name, m in entry["metrics"].items():
            assert isinstance(m["before"], float | int) and isinstance(m["after"], float | int), (stage, name)
            assert isinstance(m["higher_is_better"], bool)
        assert entry["samples"] and entry["samples"] > 0, stage
        if stage != "tokenizer":
            assert entry["parameters"] > 1e6, stage
    assert report["stages"]["pretrain"]["metrics"]["eval_loss"]["baseline"] > 0
    assert "eval_perplexity" in report["stages"]["pretrain"]["metrics"]
    assert "answer_accuracy" in report["stages"]["dpo"]["metrics"]  # what DPO keeps of SFT
    assert "kl" in report["stages"]["ppo"]["metrics"]
    assert {"vlm_accuracy", "vlm_accuracy_blank_image"} <= set(report["stages"]["vlm"]["metrics"])
    env = report["environment"]
    assert env["torch"] and env["transformers"] and env["cpu_cores"] >= 1
    assert set(report["chats"]) == {"sft", "dpo", "grpo", "ppo"}


def test_report_md_has_every_section_and_valid_plots(course):
    md = (course / "report.md").read_text()
    for section in ("## Stages", "## Curves", "## Sample chats", "## Environment"):
        assert section in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    for stage in STAGES:
        row = next(r for r in rows if r.startswith(f"| {stage} |"))
        assert any(ch.isdigit() for ch in row.split("|")[-2]), row  # an "after" number
    plots = sorted((course / "plots").glob("*.png"))
    assert {p.stem for p in plots} >= set(STAGES) - {"tokenizer"}
    for p in plots:
        assert f"plots/{p.name}" in md
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 200


def test_make_figures_draws_every_stage_headline_and_copies_the_stage_plots(course, tmp_path, capsys):
    from server.browser import missing_chromium
    from trainer.lib.curves import HEADLINE

    assert load_script("make_figures").main(["--from", str(course), "--to", str(tmp_path)]) == 0
    if missing_chromium():  # the web chat screenshot needs a browser: said, not silently skipped
        assert f"skipped web_chat.png: {missing_chromium()}" in capsys.readouterr().out
    else:
        with Image.open(tmp_path / "web_chat.png") as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] == 1000 and im.size[1] > 300  # the viewport of a 1000 x 620 window
    overview = tmp_path / "course_curves.png"
    with Image.open(overview) as im:
        im.verify()
        assert im.format == "PNG"
        width, height = im.size
    rows = (len(HEADLINE) + 3) // 4
    assert width >= 4 * 4 * 90 * 0.9 and height >= rows * 3 * 90 * 0.9  # 4 columns: more than 4 stages were drawn
    copied = {p.name for p in tmp_path.glob("stage_*.png")}
    assert copied == {f"stage_{p.name}" for p in (course / "plots").glob("*.png")} and copied


def test_make_figures_without_a_run_names_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("make_figures").main(["--from", str(tmp_path)])
    assert "run python scripts/run_pipeline.py" in capsys.readouterr().err


def test_resume_skips_finished_stages(course):
    proc = pipeline("--out_dir", str(course), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("finished earlier") == len(STAGES)
    assert (course / "report.md").is_file()


def test_plan_resumes_the_interrupted_stage(tmp_path):
    run_pipeline = load_script("run_pipeline")
    for stage in ("tokenizer", "pretrain", "sft"):
        d = tmp_path / stage / ("" if stage == "tokenizer" else "checkpoint-4")
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text("{}") if stage == "tokenizer" else mark_complete(d)
    state = {"stages": {"tokenizer": {"status": "done"}, "pretrain": {"status": "done"}, "sft": {"status": "running"}}}
    assert run_pipeline.plan(["tokenizer", "pretrain", "sft", "dpo"], state, tmp_path, resume=True) == [
        ("tokenizer", "skip"), ("pretrain", "skip"), ("sft", "resume"), ("dpo", "run")]
    assert [a for _, a in run_pipeline.plan(["tokenizer", "sft"], state, tmp_path, resume=False)] == ["run", "run"]


def test_a_failing_stage_stops_with_its_message_and_the_rerun_command(tmp_path):
    proc = pipeline("--out_dir", str(tmp_path), "--stages", "sft,dpo")
    assert proc.returncode == 2
    assert "no checkpoint yet. Create it with: python trainer/train_1_pretrain.py" in proc.stdout + proc.stderr
    assert "stage sft failed" in proc.stderr
    assert f"Rerun it alone with: python trainer/train_2_sft.py --out_dir {tmp_path}" in proc.stderr
    assert "[2/2]" not in proc.stdout  # dpo never started
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"]["sft"]["status"] == "failed"


def test_unknown_stage_is_a_usage_error_listing_the_stages(tmp_path):
    proc = pipeline("--out_dir", str(tmp_path), "--stages", "sft,rlhf")
    assert proc.returncode == 2
    assert "unknown stage(s) rlhf" in proc.stderr
    assert all(s in proc.stderr for s in STAGES)
