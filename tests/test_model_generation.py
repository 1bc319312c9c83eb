"""Decoding with the KV cache must be a pure speed-up: same tokens, same logits as recomputing.

Also: left-padded batches equal one-by-one decoding, a returned cache can be continued, the static
cache works, `logits_to_keep` slices correctly and a streamer sees exactly the generated tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from model import MiniMindConfig, MiniMindForCausalLM

VOCAB, PAD = 89, 0
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}


def random_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                  pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(seed)
    m = MiniMindForCausalLM(MiniMindConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m


MODELS = {
    "dense": dict(),
    "dense-yarn": dict(rope_parameters=YARN),
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
}


def generate(m, ids, n=16, **kwargs):
    return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.fixture(params=list(MODELS))
def lm(request):
    return random_model(**MODELS[request.param])


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (1, length), generator=g)


def test_cached_decoding_equals_recomputing(lm):
    ids = prompt(30)  # + 16 new tokens crosses YaRN's 32 original positions
    cached = generate(lm, ids, output_logits=True, return_dict_in_generate=True)
    uncached = generate(lm, ids, use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    # A manual loop that recomputes the whole sequence at every step, no cache anywhere.
    seq = ids
    with torch.no_grad():
        for step in range(16):
            logits = lm(seq, use_cache=False).logits[:, -1]
            assert (logits - cached.logits[step]).abs().max() <= 1e-4
            assert (logits - uncached.logits[step]).abs().max() <= 1e-4
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, cached.sequences)


def test_left_padded_batch_equals_one_by_one(lm):
    prompts = [prompt(n, seed=n)[0] for n in (5, 11, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch = generate(lm, ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    for row, p in enumerate(prompts):
        alone = generate(lm, p[None], output_logits=True, return_dict_in_generate=True)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(p):])
        for step in range(16):
            assert (batch.logits[step][row] - alone.logits[step][0]).abs().max() <= 1e-4


def test_returned_cache_can_be_continued(lm):
    ids = prompt(12)
    first = generate(lm, ids, n=6, return_dict_in_generate=True)
    cache = first.past_key_values
    # The last generated token has not been fed yet: the cache holds one token fewer than sequences.
    assert cache.get_seq_length() == first.sequences.shape[1] - 1
    continued = generate(lm, first.sequences, n=6, past_key_values=cache)
    assert torch.equal(continued, generate(lm, ids, n=12))

    again = generate(lm, ids, n=6, return_dict_in_generate=True)
    seen = again.past_key_values.get_seq_length()
    extra = torch.cat([again.sequences, prompt(5, seed=9)], dim=1)
    with torch.no_grad():
        step = lm(extra[:, seen:], past_key_values=again.past_key_values).logits
        full = lm(extra, use_cache=False).logits
    assert (step - full[:, seen:]).abs().max() <= 1e-4


def test_static_cache(lm):
    ids = prompt(10)
    static = generate(lm, ids, cache_implementation="static")
    assert torch.equal(static, generate(lm, ids))
    # Left-padded batch: generate() hands the model a ready 4-D mask sized to the static cache.
    batch = torch.cat([torch.full((1, 4), PAD), prompt(6, seed=1)], dim=1)
    batch = torch.cat([batch, prompt(10, seed=2)])
    mask = (batch != PAD).long()
    assert torch.equal(generate(lm, batch, attention_mask=mask, cache_implementation="static"),
                       generate(lm, batch, attention_mask=mask))


def test_logits_to_keep():
    m = random_model()
    ids = prompt(20)
    with torch.no_grad():
        full = m(ids).logits
        assert torch.equal(m(ids, logits_to_keep=0).logits, full)
        assert torch.allclose(m(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
        assert torch.allclose(m(ids, logits_to_keep=7).logits, full[:, -7:], atol=1e-6)
        positions = torch.tensor([0, 3, 19])
        assert torch.allclose(m(ids, logits_to_keep=positions).logits, full[:, positions], atol=1e-6)
    assert m(ids, logits_to_keep=7).logits.shape == (1, 7, VOCAB)


class Collect(BaseStreamer):
    """Records what generate() pushes: first the prompt, then one token per step, then end()."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ended = True


def test_streamer_receives_the_generated_tokens():
    m = random_model()
    ids = prompt(9)
    streamer = Collect()
    out = generate(m, ids, n=10, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], ids[0])
    assert len(streamer.chunks) == 11
    assert torch.equal(torch.cat(streamer.chunks[1:]), out[0, ids.shape[1]:])
