"""Weight mapping between MiniMind-V (model/vlm.py) and stock transformers `LlavaForConditionalGeneration`.

Both are the same three parts, so the mapping renames keys and nothing else:
    ours                        Llava
    vision_tower.X          <-> model.vision_tower.X           our ViT <-> SiglipVisionModel (same names)
    multi_modal_projector.X <-> model.multi_modal_projector.X  linear_1 -> GELU (exact) -> linear_2
    model.X                 <-> model.language_model.X         MiniMind <-> Qwen3 / Qwen3-MoE (model/convert.py)
    lm_head.weight          <-> lm_head.weight                 tied to the embeddings when the LM ties them

The config mapping is where the two could silently disagree: which hidden state the projector
reads (`vision_feature_layer`), whether the first token is dropped (`vision_feature_select_strategy`),
the projector's activation and biases, and the ViT's GELU (SigLIP's tanh approximation). Each is
written out explicitly, and anything with no equivalent raises ConversionError. As in
model/convert.py, weights go through in-memory state dicts of live models, so transformers' own
`save_pretrained` / `from_pretrained` handle the files.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedConfig, SiglipVisionConfig

from .convert import ConversionError, _fuse_experts, _load_exact, _split_experts, from_qwen3_config, to_qwen3_config
from .vision import VisionConfig
from .vlm import MiniMindVLM, MiniMindVLMConfig

# Our ViT's config fields, named as in SiglipVisionConfig.
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
# The activations our ViT computes as named (any other name would silently run exact GELU there).
VISION_ACTS = ("gelu_pytorch_tanh", "gelu")
# (our prefix, Llava's prefix); the bare "model." comes last so it never shadows the others.
PREFIXES = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
            ("lm_head.", "lm_head."), ("model.", "model.language_model."))


def _rename(state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Keys re-prefixed by the first matching (from, to) pair; a key no pair matches has no home."""
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ConversionError(f"weight {key!r} belongs to no part of the other model")
    return out


def to_llava_config(config: MiniMindVLMConfig) -> LlavaConfig:
    if config.image_token_id is None:
        raise ConversionError("image_token_id is not set; Llava needs the <image> token's id")
    vision = config.vision_config
    if vision.model_type == "minimind_vision":
        if vision.hidden_act not in VISION_ACTS:
            raise ConversionError(f"vision hidden_act {vision.hidden_act!r} has no exact SigLIP equivalent "
                                  f"(supported: {', '.join(VISION_ACTS)})")
        vision = SiglipVisionConfig(**{k: getattr(vision, k) for k in VISION_FIELDS}, vision_use_head=False)
    else:
        # A transformers tower (SigLIP, CLIP...): Llava builds it with the same AutoModel.from_config.
        vision = type(vision).from_dict(vision.to_dict())
    text = to_qwen3_config(config.text_config)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=config.image_token_id,
                       image_seq_length=config.image_seq_length, projector_hidden_act="gelu",
                       vision_feature_layer=config.vision_feature_layer,
                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                       multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings)


def _vision_from_siglip(vision: PreTrainedConfig) -> PreTrainedConfig:
    """SigLIP without the pooling head and with fields our ViT has -> our ViT; anything else as is."""
    if not isinstance(vision, SiglipVisionConfig) or vision.vision_use_head or vision.hidden_act not in VISION_ACTS:
        return type(vision).from_dict(vision.to_dict())
    try:
        return VisionConfig(**{k: getattr(vision, k) for k in VISION_FIELDS})
    except ValueError:  # e.g. image_size not a multiple of patch_size: keep SigLIP's own module
        return type(vision).from_dict(vision.to_dict())


def from_llava_config(config: LlavaConfig) -> MiniMindVLMConfig:
    if not isinstance(config.vision_feature_layer, int):
        raise ConversionError(f"vision_feature_layer {config.vision_feature_layer!r} concatenates several layers; "
                              "MiniMind-V reads one")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise ConversionError(f"projector with act={config.projector_hidden_act!r}, "
                              f"bias={config.multimodal_projector_bias} has no MiniMind-V equivalent (gelu, bias)")
    if config.text_config.model_type not in ("qwen3", "qwen3_moe"):
        raise ConversionError(f"Llava's language model is {config.text_config.model_type!r}; "
                              "only qwen3 and qwen3_moe map onto MiniMind")
    text = from_qwen3_config(config.text_config)
    text.tie_word_embeddings = config.tie_word_embeddings
    return MiniMindVLMConfig(text_config=text, vision_config=_vision_from_siglip(config.vision_config),
                             image_token_id=config.image_token_index,
                             vision_feature_layer=config.vision_feature_layer,
                             vision_feature_select_strategy=config.vision_feature_select_strategy)


def to_llava(vlm: MiniMindVLM) -> LlavaForConditionalGeneration:
    """A stock Llava model holding exactly our weights (same dtype)."""
    target = LlavaForConditionalGeneration(to_llava_config(vlm.config)).to(vlm.dtype)
    _load_exact(target, _rename(_fuse_experts(vlm.state_dict()), PREFIXES))
    return target.eval()


def from_llava(llava: LlavaForConditionalGeneration) -> MiniMindVLM:
    """Our VLM holding exactly a stock Llava model's weights."""
    target = MiniMindVLM(from_llava_config(llava.config)).to(llava.dtype)
    state = _rename(llava.state_dict(), tuple((theirs, ours) for ours, theirs in PREFIXES))
    _load_exact(target, _split_experts(state))
    return target.eval()
