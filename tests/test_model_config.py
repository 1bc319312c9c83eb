"""Config validation, RoPE against transformers' reference functions, and the parameter counter."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from model import (PRESETS, MiniMindConfig, MiniMindForCausalLM, RotaryEmbedding, config_from_preset,
                   count_parameters, format_parameters, rope_frequencies)


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_attention_heads=8), "divisible by num_attention_heads"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "factor"),
])
def test_bad_configs_fail_at_config_time(fields, message):
    with pytest.raises(ValueError, match=message):
        MiniMindConfig(**fields)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        config_from_preset("huge")


ROPES = [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "default", "rope_theta": 1e4},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 2048,
     "beta_fast": 16.0, "beta_slow": 2.0},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 128,
     "truncate": False},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: "-".join(str(v) for v in r.values()))
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_matches_transformers(rope, head_dim):
    ref_config = Qwen3Config(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                             max_position_embeddings=8192, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        ref_inv, ref_factor = Qwen3RotaryEmbedding.compute_default_rope_parameters(ref_config)
    else:
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](ref_config, None)
    inv, factor = rope_frequencies(rope, head_dim, 8192)
    assert torch.allclose(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)

    # And the cos/sin tables themselves, at positions past the original context.
    ours = RotaryEmbedding(rope, head_dim, 8192)
    theirs = Qwen3RotaryEmbedding(ref_config)
    x = torch.zeros(1, dtype=torch.float32)
    positions = torch.tensor([[0, 1, 5, 63, 64, 200, 3000]])
    for a, b in zip(ours(x, positions), theirs(x, positions)):
        assert torch.allclose(a, b, atol=1e-5)


def test_count_parameters_matches_unique_numel():
    for tied in (True, False):
        m = MiniMindForCausalLM(MiniMindConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=tied, num_experts=2 if tied else 0))
        counts = count_parameters(m)
        assert counts["total"] == sum(p.numel() for p in m.parameters())  # parameters() dedups tied
        assert counts["lm_head"] == (0 if tied else 100 * 64)
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
        assert format_parameters(m).startswith("total ")


def test_presets_build_and_small_is_minimind_sized():
    totals = {}
    for name in ("tiny", "small", "base", "moe", "tiny-moe"):
        assert name in PRESETS
        with torch.device("meta"):
            m = MiniMindForCausalLM(config_from_preset(name, vocab_size=6400))
        totals[name] = count_parameters(m)["total"]
        assert totals[name] == sum(p.numel() for p in m.parameters())
    assert 25e6 <= totals["small"] <= 27e6, totals
    assert totals["tiny"] < totals["small"] < totals["base"] < totals["moe"] * 2
    assert totals["moe"] > totals["small"]


def test_router_aux_loss_coef_is_zero_without_experts():
    # trl adds config.router_aux_loss_coef * aux_loss whenever it is non-zero; a dense model has no
    # aux loss, so a stale non-zero value (e.g. from an old checkpoint's config.json) must not survive.
    assert MiniMindConfig(hidden_size=64, num_attention_heads=4).router_aux_loss_coef == 0.0
    assert MiniMindConfig(hidden_size=64, num_attention_heads=4, router_aux_loss_coef=0.01).router_aux_loss_coef == 0.0
    moe = dict(hidden_size=64, num_attention_heads=4, num_experts=4, num_experts_per_tok=2)
    assert MiniMindConfig(**moe).router_aux_loss_coef == 0.01
    assert MiniMindConfig(**moe, router_aux_loss_coef=0.05).router_aux_loss_coef == 0.05
