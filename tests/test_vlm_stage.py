"""Stage 7 (trainer/train_7_vlm.py) end to end on a tiny LM: both phases, what each saves and reports,
a few steps that lower the loss, phase 2 alone, the errors that name the fix, chat and evaluation."""

import io
import json

import pytest
from PIL import Image
from transformers import TrainerCallback

from dataset.chat_template import IMAGE
from conftest import CountSteps, load_script
from trainer import train_7_vlm as vlm_stage
from trainer.lib.stages import StageError

pytestmark = pytest.mark.usefixtures("plumb_single_thread")

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def colour_parquet(path, n: int) -> None:
    """n one-colour 16 px images, alternating red/blue, each asked for its colour."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs, blobs = [], []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), COLOURS[name]).save(buf, format="PNG")
        convs.append(json.dumps([{"role": "user", "content": f"{IMAGE}\nWhat colour is it?"},
                                 {"role": "assistant", "content": name}]))
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"conversations": convs, "image_bytes": blobs}), path)


TINY_VIT = ["--image_size", "16", "--patch_size", "8", "--vision_hidden_size", "32", "--vision_heads", "2",
            "--vision_layers", "1"]


def run(out, data, *extra):
    return vlm_stage.main(["--out_dir", str(out), "--init_from", "pretrain", "--data", str(data), "--batch_size", "8",
                           "--eval_answers", "8", "--logging_steps", "1", *TINY_VIT, *extra])


def test_both_phases_save_a_vlm_with_its_processor_and_report_real_vs_blank(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 64)
    out = run(stage_copy, data, "--max_steps", "3")
    assert out == stage_copy / "vlm" / "checkpoint-3"
    for ckpt in (stage_copy / "vlm" / "align" / "checkpoint-3", out):
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
            p.name for p in ckpt.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "minimind_vlm"
    metrics = json.loads((stage_copy / "vlm" / "metrics.json").read_text())
    assert set(metrics) == {"vlm_accuracy", "vlm_accuracy_blank_image"}
    assert metrics["vlm_accuracy"]["n"] == 4  # every 20th of 64 records is held out
    log = (stage_copy / "vlm" / "train.log").read_text()
    assert "language model: loaded" in log and "trainable: vision tower" in log
    assert "language model 0.00M" in log  # phase 1: the LM is frozen


def test_a_few_steps_lower_the_loss(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 160)
    out = run(stage_copy, data, "--phase", "2", "--init_from", "pretrain", "--max_steps", "25", "--lr", "3e-3",
              "--warmup_ratio", "0")
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) >= 20 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3


def test_phase_2_alone_needs_phase_1_or_an_init(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 16)
    with pytest.raises(StageError, match=r"vlm/align has no aligned model. Create it with: python trainer/train_7_vlm.py --phase 1"):
        vlm_stage.main(["--out_dir", str(stage_copy), "--phase", "2", "--data", str(data)])


def test_missing_sft_checkpoint_names_the_command(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 16)
    with pytest.raises(StageError, match="python trainer/train_2_sft.py"):
        vlm_stage.main(["--out_dir", str(stage_copy), "--data", str(data)])


def test_chat_and_evaluate_read_the_image(stage_copy, tmp_path, capsys):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 32)
    out = run(stage_copy, data, "--max_steps", "2", "--eval_answers", "0")
    image = tmp_path / "red.png"
    Image.new("RGB", (16, 16), COLOURS["red"]).save(image)
    chat = load_script("test_chat")
    turns = chat.main(["--stage", str(out), "--image", str(image), "--prompt", "What colour is it?",
                       "--temperature", "0", "--max_new_tokens", "4"])
    assert len(turns) == 1
    with pytest.raises(StageError, match="pass --image PATH"):
        chat.main(["--stage", str(out), "--prompt", "hi"])
    evaluate = load_script("evaluate")
    result = evaluate.main(["--stage", str(out), "--task", "vlm_acc", "--data", str(data), "--limit", "6"])
    assert result["n"] == 6 and 0 <= result["vlm_acc"] <= 1 and "vlm_acc_blank_image" in result


def test_vlm_acc_on_a_language_model_says_so(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 4)
    evaluate = load_script("evaluate")
    with pytest.raises(StageError, match="holds a 'minimind' model, not a MiniMind VLM"):
        evaluate.main(["--stage", str(stage_copy / "pretrain" / "checkpoint-1"), "--task", "vlm_acc", "--data", str(data)])


class Die(Exception):
    pass


class DieAt(TrainerCallback):
    """A crash: raise at the start of step `step + 1` of the `phase`-th training run in this process
    (after the save at `step`), so no later phase runs, as with a killed process."""

    def __init__(self, phase: int, step: int):
        self.phase, self.step, self.runs = phase, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs += 1

    def on_step_begin(self, args, state, control, **kwargs):
        if self.runs == self.phase and state.global_step == self.step:
            raise Die(f"phase {self.phase}, step {self.step}")



@pytest.mark.parametrize("phase", [1, 2])
def test_interrupted_in_either_phase_resumes_to_the_same_weights(stage_copy, tmp_path, phase):
    import shutil

    import torch
    from safetensors.torch import load_file

    data = tmp_path / "colours.parquet"
    colour_parquet(data, 64)
    steps = ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--eval_answers", "2"]
    cut_dir = tmp_path / "cut"
    shutil.copytree(stage_copy, cut_dir)
    full = run(stage_copy, data, *steps)
    with pytest.raises(Die):
        vlm_stage.main(["--out_dir", str(cut_dir), "--init_from", "pretrain", "--data", str(data), "--batch_size", "8",
                        "--logging_steps", "1", *TINY_VIT, *steps], callbacks=[DieAt(phase, 2)])
    counted = CountSteps()
    resumed = vlm_stage.main(["--out_dir", str(cut_dir), "--init_from", "pretrain", "--data", str(data), "--batch_size",
                              "8", "--logging_steps", "1", *TINY_VIT, *steps, "--resume"], callbacks=[counted])
    assert resumed == cut_dir / "vlm" / "checkpoint-4"
    assert counted.n == {1: 2 + 4, 2: 2}[phase]  # only the missing steps ran
    log = (cut_dir / "vlm" / "train.log").read_text()
    assert f"phase {phase} continues" in log
    assert ("phases 1 and 2 to run" in log) == (phase == 1)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_without_a_checkpoint_is_a_clear_error(stage_copy, tmp_path):
    data = tmp_path / "colours.parquet"
    colour_parquet(data, 16)
    with pytest.raises(StageError, match="--resume: no checkpoint in .*vlm"):
        run(stage_copy, data, "--resume")
