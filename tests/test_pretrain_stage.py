"""Stage 1 (trainer/train_1_pretrain.py) on CPU: the loss goes down, checkpoints load with the Auto
classes, TensorBoard events read back, --resume is exact, real data works, torchrun works."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers MiniMind with the Auto classes)
from conftest import StopAt
from trainer import train_0_tokenizer, train_1_pretrain
from trainer.lib.stages import latest_checkpoint

pytestmark = pytest.mark.usefixtures("plumb_single_thread")


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_pretrain_loss_decreases(plumb_pretrain):
    _, trainer = plumb_pretrain
    losses = _losses(trainer)
    assert trainer.state.global_step == 8 and len(losses) == 8
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(320), abs=0.5)  # an untrained model is ~uniform
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2
    evals = _losses(trainer, "eval_loss")  # at step 0 (the "before" of the report), 4 and 8
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [0, 4, 8]
    assert evals[0] == pytest.approx(math.log(320), abs=0.5) and evals[2] < evals[1] < evals[0]


def test_pretrain_checkpoint_loads_with_auto_classes(plumb_pretrain):
    out, trainer = plumb_pretrain
    ckpt = latest_checkpoint(out / "pretrain")
    assert ckpt.name == "checkpoint-8"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Tom has a red ball.", return_tensors="pt")["input_ids"]
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id


def test_pretrain_writes_tensorboard_events(plumb_pretrain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = plumb_pretrain
    event_files = list((out / "pretrain" / "runs").rglob("events.out.tfevents*"))
    assert event_files
    acc = EventAccumulator(str(event_files[0].parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    # SampleCallback's generations are a TensorBoard text summary, one per evaluation (steps 0, 4, 8).
    tag = next(t for t in acc.Tags()["tensors"] if t.startswith("samples"))
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
    assert [e.step for e in acc.Tensors(tag)] == [0, 4, 8]
    assert all("`Tom has -> " in t for t in texts)



def test_resume_matches_an_uninterrupted_run(plumb_pretrain, plumb_pretrain_argv, tmp_path):
    full_out, full = plumb_pretrain
    cut = train_1_pretrain.main(plumb_pretrain_argv(tmp_path), callbacks=[StopAt(4)])
    assert cut.state.global_step == 4 and latest_checkpoint(tmp_path / "pretrain").name == "checkpoint-4"
    resumed = train_1_pretrain.main(plumb_pretrain_argv(tmp_path, "--resume"))
    assert resumed.state.global_step == 8
    assert _losses(resumed)[-4:] == _losses(full)[-4:]  # same batches, same updates
    a = load_file(full_out / "pretrain" / "checkpoint-8" / "model.safetensors")
    b = load_file(tmp_path / "pretrain" / "checkpoint-8" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_without_checkpoint_is_a_clear_error(plumb_pretrain_argv, tmp_path):
    from trainer.lib.stages import StageError

    with pytest.raises(StageError, match="--resume: no checkpoint"):
        train_1_pretrain.main(plumb_pretrain_argv(tmp_path, "--resume"))


def test_pretrain_on_real_tinystories(data_shared_dir, plumb_preset, tmp_path):
    """TinyStories: a tokenizer trained on it, then a few pretraining steps with it."""
    data = data_shared_dir / "pretrain_tinystories.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} not found")
    train_0_tokenizer.main(["--data", str(data), "--vocab_size", "512", "--max_texts", "400",
                            "--max_eval_texts", "50", "--out_dir", str(tmp_path)])
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    story = "Once upon a time, a little girl named Lily found a big red ball in the park."
    assert tok.decode(tok.encode(story)) == story
    assert len(tok.encode(story)) < len(story) / 2  # real merges on real text
    trainer = train_1_pretrain.main([
        "--data", str(data), "--out_dir", str(tmp_path), "--preset", plumb_preset, "--max_length", "64",
        "--batch_size", "4", "--max_steps", "6", "--logging_steps", "1", "--eval_steps", "100",
        "--max_eval_blocks", "4", "--sample_prompts", "Once upon a time", "--device", "cpu"])
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert latest_checkpoint(tmp_path / "pretrain").name == "checkpoint-6"


def test_torchrun_two_processes(plumb_corpus, plumb_tokenizer_out, torchrun, tmp_path):
    """`torchrun --nproc_per_node 2` runs the same script as two gloo processes (correctness, not speed)."""
    torchrun("trainer/train_1_pretrain.py",
             "--data", str(plumb_corpus["pretrain_train"]), "--eval_data", str(plumb_corpus["pretrain_eval"]),
             "--init_from", str(plumb_tokenizer_out / "tokenizer"), "--out_dir", str(tmp_path),
             "--max_steps", "2", "--max_length", "32", "--batch_size", "2", "--eval_steps", "100", "--save_steps", "100",
             "--max_eval_blocks", "2", "--sample_prompts", "Tom", "--device", "cpu")
    ckpt = latest_checkpoint(tmp_path / "pretrain")
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["num_input_tokens_seen"] == 2 * 2 * 32 * 2  # both processes' tokens: 2 ranks x 2 blocks x 32 x 2 steps


def test_pretrain_reports_held_out_loss_before_and_after(plumb_pretrain):
    """metrics.json: the untrained model's held-out loss (about ln(vocab)) and the trained one's, which
    is lower and equals the final evaluation; the same pair is in TensorBoard as heldout/eval_loss."""
    import json
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, trainer = plumb_pretrain
    m = json.loads((out / "pretrain" / "metrics.json").read_text())["eval_loss"]
    assert m["higher_is_better"] is False
    assert abs(m["before"] - math.log(len(trainer.processing_class))) < 0.5
    final = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert m["after"] == final < m["before"]
    acc = EventAccumulator(str(out / "pretrain" / "runs"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("heldout/eval_loss")] == [
        (0, round(m["before"], 5)), (8, round(m["after"], 5))]
