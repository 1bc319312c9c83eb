"""The MiniMind models: a backbone plus heads, following the transformers contract.

    MiniMindModel                     input_ids [B, T] -> last_hidden_state [B, T, hidden]
    MiniMindForCausalLM               + lm_head -> logits [B, T, vocab]; loss; generate()
    MiniMindForSequenceClassification + score head -> logits [B, num_labels] at the last real token
                                      (reward model), and per-token values (PPO critic)

Standard submodule names (`model.layers.N.self_attn.q_proj`, `lm_head`, ...) are what make
`generate`, trl, peft and the export to stock Qwen3 work without adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast

from .attention import build_attention_mask
from .config import MiniMindConfig
from .decoder import DecoderLayer
from .norm import RMSNorm
from .rope import RotaryEmbedding, rope_frequencies


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    config: MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding ~ N(0, 0.02), norms = 1
        if isinstance(module, RotaryEmbedding):
            # A non-persistent buffer is not in the checkpoint; from_pretrained builds the model on the
            # meta device, so recompute it here or it stays uninitialised memory.
            inv_freq, _ = rope_frequencies(module.rope_parameters, module.head_dim, module.max_position_embeddings)
            init.copy_(module.inv_freq, inv_freq)


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs: Any) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation would append to the cache twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        T = inputs_embeds.shape[1]
        past_len, kv_len = 0, T
        if use_cache and past_key_values is not None:
            # A StaticCache reports a 0-d tensor and hands back all its slots (kv_len > past + T).
            past_len = int(past_key_values.get_seq_length())
            kv_len = past_key_values.get_mask_sizes(T, 0)[0]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, position_ids, T, past_len, inputs_embeds, kv_len)
        cos_sin = self.rotary_emb(inputs_embeds, position_ids)

        hidden = self.dropout(inputs_embeds)
        all_hidden = [] if output_hidden_states else None
        aux_losses = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden, aux = layer(hidden, cos_sin, mask, past_key_values if use_cache else None)
            if aux is not None:
                aux_losses.append(aux)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            # Mean over MoE layers, so the coefficient does not depend on depth.
            router_logits=torch.stack(aux_losses).mean() if aux_losses else None,
        )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t predict labels[t + 1]; -100 labels are skipped.

    Summed then divided by the number of predicted tokens (or by `num_items_in_batch`, which the
    Trainer passes so gradient accumulation weights every token equally). A batch with no label
    at all gives 0, not NaN.
    """
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the whole [B, T, vocab] tensor.
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).to(logits.device)
    total = nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / max(count, 1) if not isinstance(count, torch.Tensor) else total / count.clamp(min=1)


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] at the positions the LM head must score: all (0), the last k (int k), or
    those of an index tensor. Skipping the vocab projection elsewhere saves time."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    return hidden[:, logits_to_keep]


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast:
        """`logits_to_keep`: 0 = all positions; k = only the last k (generation needs 1, GRPO the
        completion); a tensor = those positions. Skipping the vocab projection elsewhere saves time."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        logits = self.lm_head(keep_positions(out.last_hidden_state, logits_to_keep))
        aux_loss = out.router_logits
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=out.past_key_values, hidden_states=out.hidden_states)


class MiniMindForSequenceClassification(MiniMindPreTrainedModel):
    """Backbone + linear `score` head. `logits` [B, num_labels] are read at each row's last real
    token (the whole answer has been seen there): a reward model with num_labels=1. `token_values`
    gives the head at every position [B, T], which is what a PPO critic needs."""

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MiniMindModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def token_values(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.LongTensor | None = None, positions: slice = slice(None)) -> torch.Tensor:
        """The head (first label) at every position [B, T], or only at `positions` (a slice of T, as
        `logits_to_keep` does for the LM head): V(s_t) for a PPO critic."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return self.score(hidden[:, positions])[..., 0]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> SequenceClassifierOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        scores = self.score(out.last_hidden_state)  # [B, T, num_labels]
        B, T = scores.shape[:2]
        if attention_mask is not None:
            real = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=scores.device)
        # Index of the last real token; works for left and right padding alike.
        last = (torch.arange(T, device=scores.device) * real).argmax(-1)
        logits = scores[torch.arange(B, device=scores.device), last]
        loss = None
        if labels is not None:
            loss = (nn.functional.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else nn.functional.cross_entropy(logits, labels))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
