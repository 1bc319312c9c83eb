"""What training relies on: exact save/load through the Auto classes, loss masking, the MoE
load-balancing gradient, gradient checkpointing, packed sequences and the reward/value head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from model import MiniMindConfig, MiniMindForCausalLM, MiniMindForSequenceClassification, MiniMindModel

VOCAB, PAD = 83, 0


def config(**overrides) -> MiniMindConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                  pad_token_id=PAD, eos_token_id=None)
    return MiniMindConfig(**{**fields, **overrides})


def randomise(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.15 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return m


def random_lm(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return randomise(MiniMindForCausalLM(config(**overrides)), seed).eval()


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_through_auto_classes(tmp_path, tied):
    m = random_lm(tie_word_embeddings=tied, num_experts=2 if tied else 0, num_experts_per_tok=1)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()

    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is MiniMindConfig
    saved = {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded_config.to_dict().items() if k != "_name_or_path"} == saved

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MiniMindForCausalLM
    for key, value in m.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    ids = tokens(2, 17)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, m(ids).logits)
        # The inv_freq buffer is not in the checkpoint: it must be recomputed, not left as garbage.
        assert torch.equal(loaded.model.rotary_emb.inv_freq, m.model.rotary_emb.inv_freq)

        backbone = AutoModel.from_pretrained(tmp_path).eval()
        assert type(backbone) is MiniMindModel
        assert torch.equal(backbone(ids).last_hidden_state, m.model(ids).last_hidden_state)

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert type(classifier) is MiniMindForSequenceClassification
    for key, value in m.model.state_dict().items():
        assert torch.equal(value, classifier.model.state_dict()[key]), key
    classifier.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_loss_skips_minus_100_labels():
    m = random_lm()
    ids = tokens(3, 20)
    labels = ids.clone()
    labels[0, :8] = -100  # a masked prompt
    labels[2, 5:] = -100
    logits = m(ids).logits
    kept = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][kept], labels[:, 1:][kept])
    loss = m(ids, labels=labels).loss
    assert torch.allclose(loss, manual, atol=1e-6)

    nothing = m(ids, labels=torch.full_like(ids, -100)).loss
    assert torch.isfinite(nothing) and nothing.item() == 0.0
    m.zero_grad()
    nothing.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_moe_aux_loss_trains_the_router():
    m = random_lm(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.05)
    ids = tokens(2, 16)
    out = m(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    lm_only = causal_lm_loss_of(m, ids)
    assert torch.allclose(out.loss, lm_only + 0.05 * out.aux_loss, atol=1e-6)
    m.zero_grad()
    m(ids).aux_loss.backward()
    for layer in m.model.layers:
        grad = layer.mlp.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def causal_lm_loss_of(m, ids):
    logits = m(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("moe", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(moe):
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}
    m = random_lm(**extra).train()
    ids = tokens(2, 24)

    def grads():
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.gradient_checkpointing_enable()
    assert m.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(m.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_packed_documents_do_not_see_each_other():
    m = random_lm()
    docs = [tokens(1, n, seed=n) for n in (5, 9, 4)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        logits = m(packed, position_ids=position_ids).logits
        start = 0
        for d in docs:
            alone = m(d).logits
            assert (logits[:, start:start + d.shape[1]] - alone).abs().max() <= 1e-5
            start += d.shape[1]
        # Without the restart in positions, later documents see the earlier ones: the check has teeth.
        leaky = m(packed).logits
        assert (leaky[:, 5:14] - m(docs[1]).logits).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classifier_pools_the_last_real_token(side):
    torch.manual_seed(0)
    rm = randomise(MiniMindForSequenceClassification(config(num_labels=1))).eval()
    rows = [tokens(n, seed=n) for n in (6, 10, 3)]
    width = 10
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, span], mask[r, span] = row, 1
    with torch.no_grad():
        scores = rm(ids, attention_mask=mask).logits
        assert scores.shape == (3, 1)
        for r, row in enumerate(rows):
            alone = rm(row[None]).logits
            assert (scores[r] - alone[0]).abs().max() <= 1e-4
            assert (rm.token_values(row[None])[0, -1] - alone[0, 0]).abs() <= 1e-4
        values = rm.token_values(ids, attention_mask=mask)
    assert values.shape == (3, width)
    out = rm(ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0, 2.0]))
    assert out.loss is not None and torch.isfinite(out.loss)
