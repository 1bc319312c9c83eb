import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are programs, not a package): `load_script("evaluate").main(argv)`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class StopAt(TrainerCallback):
    """An interruption: save and stop after optimizer step `k` (as a killed run leaves its last save)."""

    def __init__(self, k: int):
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k:
            control.should_save = True
            control.should_training_stop = True


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this very run takes (`.n`): a resumed run must take only the missing ones."""

    def __init__(self):
        self.n = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.n += 1


@pytest.fixture(scope="session")
def data_shared_dir() -> Path:
    """The real-data folder beside the repo (``../shared/data``, or ``$MINIMIND_SHARED_DATA``)."""
    env = os.environ.get("MINIMIND_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real data folder not found: {path}")
    return path


@pytest.fixture(scope="session")
def data_tokenizer():
    """A tiny ByteLevel BPE (vocab 400, Qwen2's split: digits one per token) trained here on demo text,
    wrapped as a transformers fast tokenizer with the course's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dataset.demo import pretrain_texts, sft_conversations
    from dataset.pre_tokenizer import qwen2_pre_tokenizer

    texts = pretrain_texts(300, "train") + [
        m["content"] for r in sft_conversations(300, "train") for m in r["conversations"]
    ]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def data_demo_dir(tmp_path_factory) -> dict:
    """The demo world at its default sizes, written once per test session: ``{name: Path}``."""
    from dataset.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="session")
def rl_models(tmp_path_factory) -> dict:
    """What the RL stages start from, built in ~2 s: small demo files (``rl_train``, ``rl_eval``,
    ``dpo_train``, ``dpo_eval``: 32 / 8 records), an untrained ~0.1M-param MiniMind with a tiny chat
    tokenizer (``policy``: a CausalLM model dir) and a reward model made from it (``reward``: a
    num_labels=1 sequence classifier). ``{name: Path}``; read-only: point --out_dir elsewhere."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import model as mm
    from dataset.demo import DemoSizes, tokenizer_corpus, write_demo_data
    from trainer.train_0_tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("rl_models")
    sizes = DemoSizes(pretrain_train=200, pretrain_eval=8, sft_train=32, sft_eval=8, dpo_train=32, dpo_eval=8,
                      rl_train=32, rl_eval=8)
    files = write_demo_data(root / "data", sizes)
    tokenizer = build_tokenizer(tokenizer_corpus(root / "data", sizes), vocab_size=400, min_frequency=2)
    torch.manual_seed(0)
    config = mm.MiniMindConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=None)
    lm = mm.MiniMindForCausalLM(config)
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    rm.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return {"policy": root / "policy", "reward": root / "reward", **files}


@pytest.fixture
def rl_events():
    """Read a TensorBoard log dir back: ``rl_events(dir) -> {tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(log_dir) -> dict:
        scalars = {}
        for run in sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")}):
            acc = EventAccumulator(str(run))
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        return scalars

    return read


@pytest.fixture(scope="session")
def stage_out_dir(tmp_path_factory) -> Path:
    """An out_dir as the first two stages leave it, built in ~2 s without running them: a tiny
    tokenizer (stage 0's builder, vocab 400) in ``<out>/tokenizer`` and an untrained ~0.3M-param
    MiniMind saved as ``<out>/pretrain/checkpoint-1``; plus small demo files in ``<out>/small_data/``
    (``{name}.jsonl``: 64 train / 16 eval records each) for fast stage runs. Treat it as read-only:
    copy it (``stage_copy``) before running a stage into it."""
    import torch

    import model as mm
    from dataset.demo import DemoSizes, tokenizer_corpus, write_demo_data
    from trainer.lib.stages import mark_complete
    from trainer.train_0_tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("stage_out")
    sizes = DemoSizes(pretrain_train=300, pretrain_eval=16, sft_train=64, sft_eval=16, dpo_train=64, dpo_eval=16,
                      rl_train=16, rl_eval=16)
    write_demo_data(out / "small_data", sizes)
    tokenizer = build_tokenizer(tokenizer_corpus(out / "small_data", sizes), vocab_size=400, min_frequency=2)
    tokenizer.save_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    config = mm.MiniMindConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=None)
    lm = mm.MiniMindForCausalLM(config)
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    ckpt = out / "pretrain" / "checkpoint-1"
    lm.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    mark_complete(ckpt)  # as a finished Trainer save leaves it
    return out


@pytest.fixture
def stage_copy(stage_out_dir, tmp_path) -> Path:
    """A private, writable copy of ``stage_out_dir`` for one test."""
    import shutil

    dst = tmp_path / "out"
    shutil.copytree(stage_out_dir, dst)
    return dst


PLUMB_PRESET = "plumb-micro"


class _plumb_threads:
    """Run torch on one intra-op thread inside the block: ~0.1M-param steps are faster that way, and
    on a shared 2-core machine two spinning OpenMP threads can make them 50x slower."""

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


@pytest.fixture
def plumb_single_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("plumb_single_thread")``."""
    with _plumb_threads():
        yield


@pytest.fixture(scope="session")
def plumb_preset() -> str:
    """A ~0.1M-param preset registered in ``model.PRESETS`` for in-process stage runs (fast steps)."""
    import model as mm

    mm.PRESETS.setdefault(PLUMB_PRESET, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=128))
    return PLUMB_PRESET


@pytest.fixture(scope="session")
def plumb_corpus(tmp_path_factory) -> dict:
    """Small jsonl files from the demo world: ``pretrain_train`` (300 docs), ``pretrain_eval`` (30),
    ``chat`` (4 conversations), ``dpo`` and ``rl`` (2 records each): ``{name: Path}``."""
    import json

    from dataset.demo import dpo_pairs, pretrain_texts, rl_prompts, sft_conversations

    root = tmp_path_factory.mktemp("plumb_corpus")
    files = {"pretrain_train": [{"text": t} for t in pretrain_texts(300, "train")],
             "pretrain_eval": [{"text": t} for t in pretrain_texts(30, "eval")],
             "chat": sft_conversations(4, "train"), "dpo": dpo_pairs(2, "train"), "rl": rl_prompts(2, "train")}
    paths = {}
    for name, records in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


@pytest.fixture(scope="session")
def plumb_tokenizer_out(tmp_path_factory, plumb_corpus) -> Path:
    """An out_dir where stage 0 really ran (vocab 320, on ``plumb_corpus``): ``<out>/tokenizer``."""
    from trainer import train_0_tokenizer

    out = tmp_path_factory.mktemp("plumb_tok")
    with _plumb_threads():
        train_0_tokenizer.main(["--data", str(plumb_corpus["pretrain_train"]), "--eval_data",
                                str(plumb_corpus["pretrain_eval"]), "--vocab_size", "320", "--out_dir", str(out)])
    return out


@pytest.fixture(scope="session")
def plumb_pretrain_argv(plumb_corpus, plumb_tokenizer_out, plumb_preset):
    """``argv(out_dir, *extra)``: stage 1 flags for an 8-step CPU run on ``plumb_corpus`` with the
    micro preset (eval and save every 4 steps); ``extra`` flags come last and win."""
    def argv(out_dir: Path, *extra: str) -> list[str]:
        return ["--data", str(plumb_corpus["pretrain_train"]), "--eval_data", str(plumb_corpus["pretrain_eval"]),
                "--init_from", str(plumb_tokenizer_out / "tokenizer"), "--out_dir", str(out_dir),
                "--preset", plumb_preset, "--max_length", "32", "--batch_size", "4", "--max_steps", "8",
                "--logging_steps", "1", "--eval_steps", "4", "--save_steps", "4", "--max_eval_blocks", "4",
                "--sample_prompts", "Tom has", "--dtype", "fp32", "--device", "cpu", *extra]
    return argv


@pytest.fixture(scope="session")
def plumb_pretrain(tmp_path_factory, plumb_pretrain_argv):
    """One uninterrupted 8-step pretraining run: ``(out_dir, trainer)``; checkpoints at steps 4 and 8."""
    from trainer import train_1_pretrain

    out = tmp_path_factory.mktemp("plumb_pretrain")
    with _plumb_threads():
        return out, train_1_pretrain.main(plumb_pretrain_argv(out))


def launcher_env(**extra: str) -> dict[str, str]:
    """This environment for a launcher of two processes (torchrun, accelerate launch): one thread
    each, and none of the variables of a process group this one may be part of."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR"):
        env.pop(var, None)
    return env


@pytest.fixture
def torchrun():
    """Run a stage script as two gloo processes: ``torchrun(script, *args) -> combined output``.

    Fails the test (with the output's tail) on a non-zero exit or after 240 s; skips without torchrun.
    """
    from trainer.lib.stages import REPO_ROOT

    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(exe).is_file():
        pytest.skip("torchrun not found")
    env = launcher_env()

    def run(script: str, *args: str) -> str:
        cmd = [exe, "--standalone", "--nproc_per_node", "2", script, *args]  # standalone: a free port
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
            output, _ = proc.communicate()
            pytest.fail(f"torchrun did not finish in 240 s:\n{output[-3000:]}")
        assert proc.returncode == 0, output[-3000:]
        return output

    return run
