"""Weight mapping between MiniMind and stock transformers Qwen3 / Qwen3-MoE.

Our module names already are Qwen3's, so a dense model maps one to one. The only difference is the
MoE experts: we keep one SwiGLU module per expert (readable), Qwen3-MoE in transformers 5.x stores
all experts fused in 3-D tensors:
    gate_up_proj [E, 2 * I, H] = cat(gate_proj, up_proj) per expert;  down_proj [E, H, I]
Mapping goes through in-memory state dicts of live models, so whatever file layout transformers
writes for Qwen3, its own `save_pretrained` / `from_pretrained` handle it.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from .config import MiniMindConfig
from .modeling import MiniMindForCausalLM

SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "attention_bias",
                 "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class ConversionError(ValueError):
    """A checkpoint that has no equivalent on the other side."""


def to_qwen3_config(config: MiniMindConfig) -> Qwen3Config | Qwen3MoeConfig:
    if config.dropout:
        raise ConversionError(f"Qwen3 has no residual dropout; set dropout=0 (is {config.dropout}) before export")
    fields = {k: getattr(config, k) for k in SHARED_FIELDS}
    fields["rope_parameters"] = dict(config.rope_parameters)
    if config.is_moe:
        return Qwen3MoeConfig(**fields, **{k: getattr(config, k) for k in MOE_FIELDS},
                              decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3Config(**fields)


def from_qwen3_config(config: Qwen3Config | Qwen3MoeConfig) -> MiniMindConfig:
    if getattr(config, "use_sliding_window", False):
        raise ConversionError("sliding-window attention is not part of MiniMind; cannot import this checkpoint")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        raise ConversionError(f"rope_type {rope.get('rope_type')!r} is not supported by MiniMind (default, yarn)")
    fields = {k: getattr(config, k) for k in SHARED_FIELDS if hasattr(config, k)}
    fields["rope_parameters"] = rope
    fields.setdefault("head_dim", config.hidden_size // config.num_attention_heads)
    if isinstance(config, Qwen3MoeConfig):
        if config.mlp_only_layers or config.decoder_sparse_step != 1:
            raise ConversionError("Qwen3-MoE with dense layers mixed in (mlp_only_layers / decoder_sparse_step) "
                                  "has no MiniMind equivalent: MiniMind MoE uses experts in every layer")
        fields.update({k: getattr(config, k) for k in MOE_FIELDS})
    return MiniMindConfig(**fields)


def _fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, value in state.items():
        m = EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
        else:
            out[key] = value
    for prefix, by_index in experts.items():
        order = [by_index[i] for i in sorted(by_index)]
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in order])
        out[f"{prefix}.experts.down_proj"] = torch.stack([e["down_proj"] for e in order])
    return out


def _split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(".experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate[e], up[e]
        elif key.endswith(".experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return out


def _load_exact(target: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    if target.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and target.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if target.config.tie_word_embeddings:
        target.tie_weights()


def to_qwen3(model: MiniMindForCausalLM) -> Qwen3ForCausalLM | Qwen3MoeForCausalLM:
    """A stock Qwen3 model holding exactly our weights (same dtype)."""
    config = to_qwen3_config(model.config)
    target = (Qwen3MoeForCausalLM if model.config.is_moe else Qwen3ForCausalLM)(config).to(model.dtype)
    _load_exact(target, _fuse_experts(model.state_dict()))
    return target.eval()


def from_qwen3(model: Qwen3ForCausalLM | Qwen3MoeForCausalLM) -> MiniMindForCausalLM:
    """Our model holding exactly a stock Qwen3 model's weights."""
    target = MiniMindForCausalLM(from_qwen3_config(model.config)).to(model.dtype)
    _load_exact(target, _split_experts(model.state_dict()))
    return target.eval()
