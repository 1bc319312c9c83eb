"""MiniMindConfig: every number that defines the decoder, plus named size presets.

The field names deliberately match `transformers.Qwen3Config` / `Qwen3MoeConfig`, so exporting a
checkpoint to stock Qwen3 is a renaming of nothing: the architecture *is* Qwen3 (pre-norm RMSNorm,
RoPE, grouped-query attention with per-head q/k RMSNorm, SwiGLU, optional MoE, tied embeddings).

RoPE follows the transformers 5.x convention: `rope_parameters = {"rope_type": "default" | "yarn",
"rope_theta": ..., and for YaRN "factor", "original_max_position_embeddings", "beta_fast", ...}`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class MiniMindConfig(PreTrainedConfig):
    """Configuration of a MiniMind decoder (dense or mixture-of-experts).

    Shapes follow from a few numbers: queries have `num_attention_heads * head_dim` features, keys and
    values `num_key_value_heads * head_dim` (GQA: each kv head serves `heads / kv_heads` query heads).
    `head_dim` defaults to `hidden_size // num_attention_heads`.
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]
    # trl reads `config.auto_map` when it reloads a model from a path; `None` breaks the Auto classes.
    auto_map = {}

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    dropout: float = 0.0
    # Mixture of experts: off when num_experts == 0.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float | None = None  # default 0.01 with experts; always 0.0 without
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # SwiGLU has three matrices instead of two, so ~8/3 * hidden keeps the FLOPs of a 4x MLP;
            # round up to a multiple of 64 for friendly matmul shapes.
            self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
        if not self.num_experts:
            # A dense model has no router. 0.0 is what tells trl (DPO, GRPO) there is no load-balancing
            # loss to add; forced even when a config says otherwise (checkpoints written before this rule).
            self.router_aux_loss_coef = 0.0
        elif self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = 0.01
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
        self._validate()
        super().__post_init__(**kwargs)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"MiniMindConfig: {msg}")

        if self.hidden_size % self.num_attention_heads != 0:
            fail(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                 f"num_key_value_heads ({self.num_key_value_heads}): each kv head serves a whole group")
        if self.head_dim % 2 != 0:
            fail(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of features")
        if self.num_experts < 0:
            fail(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            fail(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                 f"num_experts ({self.num_experts})")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            fail(f"rope_type {rope_type!r} is not supported (use 'default' or 'yarn')")
        if rope_type == "yarn" and not self.rope_parameters.get("factor"):
            fail("YaRN needs rope_parameters['factor'] (context extension ratio, e.g. 4.0)")


# Named sizes. `tiny` is the CPU demo; `small` and `base` are MiniMind's dense sizes; `moe` is the
# small model with 4 experts per layer, 2 routed per token (`tiny-moe` the same at demo scale).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, max_position_embeddings=2048),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408),
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2048),
    "moe": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1408),
    "tiny-moe": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=704, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=352, max_position_embeddings=2048),
}


def config_from_preset(name: str, **overrides: Any) -> MiniMindConfig:
    """Build a config from a named preset; keyword overrides win (e.g. `vocab_size=len(tokenizer)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MiniMindConfig(**{**PRESETS[name], **overrides})


def count_parameters(model: Any) -> dict[str, int]:
    """Parameter counts by part. Tied embeddings are counted once (they are one tensor)."""
    seen: set[int] = set()
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "lm_head": 0, "other": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = ("embedding" if "embed_tokens" in name else "attention" if "self_attn" in name and "norm" not in name
                else "mlp" if ".mlp." in name else "norm" if "norm" in name else "lm_head" if "lm_head" in name
                else "other")
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def format_parameters(model: Any) -> str:
    """One line a learner can read: `total 4.61M (embedding 1.64M, attention ...)`."""
    c = count_parameters(model)
    parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in c.items() if k != "total" and v)
    return f"total {c['total'] / 1e6:.2f}M ({parts})"
