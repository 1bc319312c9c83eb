"""MiniMind-V: a vision tower and a projector in front of the MiniMind language model (Llava's design).

    pixel_values [n_images, 3, S, S] --vision tower--> [n_images, N, D_vision]   (N patches per image)
                                     --projector---->  [n_images, N, D_lm]
    input_ids [B, T] with N `<image>` tokens per image --embed--> [B, T, D_lm]
    splice: the embedding of the k-th `<image>` token (reading order over the batch) is replaced by
    the k-th patch feature; the LM then runs on the spliced embeddings as on any text.

The LM never learns a new mechanism: to it an image is N extra "words" whose embeddings come from
the projector instead of the embedding table. Features are computed and spliced only at prefill;
every decoding step after that reads the image through the KV cache, like any earlier token.

Submodule names (`vision_tower`, `multi_modal_projector`, `model` = the MiniMind backbone, `lm_head`)
let an SFT checkpoint's LM weights load unchanged (`model.*`, `lm_head.*`), and map one to one onto
`LlavaForConditionalGeneration` (model/convert_vlm.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MiniMindConfig
from .modeling import MiniMindModel, MiniMindPreTrainedModel, causal_lm_loss, keep_positions
from .projector import Projector
from .vision import VisionTransformer


class MiniMindVLMConfig(PreTrainedConfig):
    """`text_config`: the LM (MiniMindConfig). `vision_config`: our ViT (VisionConfig) or any
    transformers vision model config (SigLIP, CLIP) when a pretrained tower is plugged in.

    `vision_feature_layer`: which of the tower's hidden states the projector reads (-1 = last block).
    `vision_feature_select_strategy`: "full" keeps every token; "default" drops the first (CLIP's CLS).
    """

    model_type = "minimind_vlm"
    auto_map = {}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(MiniMindConfig),
        "vision_config": SubConfigSpec(AutoConfig, model_type="minimind_vision"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = self.text_config.tie_word_embeddings
        if self.vision_feature_select_strategy not in ("full", "default"):
            raise ValueError(f"vision_feature_select_strategy must be 'full' or 'default', "
                             f"got {self.vision_feature_select_strategy!r}")

    @property
    def image_seq_length(self) -> int:
        """How many `<image>` tokens stand for one image: one per feature the projector emits, i.e. the
        patches, plus CLIP's CLS token, minus the first token when "default" drops it."""
        v = self.vision_config
        cls = 1 if v.model_type.startswith("clip") else 0
        return (v.image_size // v.patch_size) ** 2 + cls - (self.vision_feature_select_strategy == "default")


def splice_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                          image_token_id: int) -> torch.Tensor:
    """embeds [B, T, D] with the `<image>` positions of input_ids replaced, in reading order, by
    features [n_images, N, D]. The counts must agree exactly: a mismatch means a prompt was built
    with another N, or an image is missing."""
    mask = input_ids == image_token_id
    n_tokens, n_features = int(mask.sum()), features.shape[0] * features.shape[1]
    if n_tokens != n_features:
        raise ValueError(f"{n_tokens} <image> tokens in input_ids but {features.shape[0]} image(s) x "
                         f"{features.shape[1]} patches = {n_features} features; every image needs exactly "
                         f"{features.shape[1]} <image> tokens (expand_image_tokens does this)")
    return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))


class MiniMindVLM(MiniMindPreTrainedModel, GenerationMixin):
    config_class = MiniMindVLMConfig
    config: MiniMindVLMConfig
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer", "VisionBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindVLMConfig) -> None:
        super().__init__(config)
        vision = config.vision_config
        self.vision_tower = (VisionTransformer(vision) if vision.model_type == "minimind_vision"
                             else AutoModel.from_config(vision))
        self.multi_modal_projector = Projector(vision.hidden_size, config.text_config.hidden_size)
        self.model = MiniMindModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_images, C, S, S] -> projected patch features [n_images, N, D_lm]."""
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """As MiniMindForCausalLM.forward, plus `pixel_values`: every image of the batch, in the order
        their `<image>` runs appear (row by row). `labels` at image positions must be -100."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            if pixel_values is not None:
                features = self.get_image_features(pixel_values)
                inputs_embeds = splice_image_features(inputs_embeds, input_ids, features, self.config.image_token_id)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)
        logits = self.lm_head(keep_positions(out.last_hidden_state, logits_to_keep))
        loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
