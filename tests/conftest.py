import os
from pathlib import Path

import pytest


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
    """A tiny ByteLevel BPE (vocab 400, digits split one per token) trained here on demo text,
    wrapped as a transformers fast tokenizer with the course's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dataset.demo import pretrain_texts, sft_conversations

    texts = pretrain_texts(300, "train") + [
        m["content"] for r in sft_conversations(300, "train") for m in r["conversations"]
    ]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
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
