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
