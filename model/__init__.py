"""MiniMind: a small Qwen3-style decoder written to be read, and a first-class transformers model.

`import model` registers it with the Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)`
loads our checkpoints. Each building block is importable on its own (model.rope, model.attention...).
"""

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification)

from .attention import Attention, build_attention_mask
from .config import PRESETS, MiniMindConfig, config_from_preset, count_parameters, format_parameters
from .decoder import DecoderLayer
from .mlp import SwiGLU
from .modeling import (MiniMindForCausalLM, MiniMindForSequenceClassification, MiniMindModel,
                       MiniMindPreTrainedModel, causal_lm_loss)
from .moe import MoE, load_balancing_loss
from .norm import RMSNorm
from .projector import Projector
from .rope import RotaryEmbedding, apply_rotary, rope_frequencies
from .vision import VisionConfig, VisionTransformer
from .vlm import MiniMindVLM, MiniMindVLMConfig, splice_image_features

AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModel.register(MiniMindConfig, MiniMindModel, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MiniMindConfig, MiniMindForSequenceClassification, exist_ok=True)
AutoConfig.register("minimind_vision", VisionConfig, exist_ok=True)
AutoModel.register(VisionConfig, VisionTransformer, exist_ok=True)
AutoConfig.register("minimind_vlm", MiniMindVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(MiniMindVLMConfig, MiniMindVLM, exist_ok=True)

__all__ = [
    "PRESETS", "Attention", "DecoderLayer", "MiniMindConfig", "MiniMindForCausalLM",
    "MiniMindForSequenceClassification", "MiniMindModel", "MiniMindPreTrainedModel", "MiniMindVLM",
    "MiniMindVLMConfig", "MoE", "Projector", "RMSNorm", "RotaryEmbedding", "SwiGLU", "VisionConfig",
    "VisionTransformer", "apply_rotary", "build_attention_mask", "causal_lm_loss", "config_from_preset",
    "count_parameters", "format_parameters", "load_balancing_loss", "rope_frequencies",
    "splice_image_features",
]
