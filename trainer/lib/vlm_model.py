"""Assembling a VLM from a trained LM, and choosing which of its parts each phase trains.

MiniMind-V's users most often (1) load the wrong LM weights, so the loss starts near ln(vocab) and
stays there, and (2) do not know what is frozen when. Here the LM checkpoint's path and tensor count
are logged, a VLM that loads nothing or a vocabulary that does not match is an error, and every
phase logs a table of trainable / total parameters per part:

    phase 1 (align):    vision tower + projector learn; the LM is frozen, so the projector must learn
                        to speak the LM's embedding language (captions are its only signal)
    phase 2 (instruct): the LM learns too (all of it, or its last --lm_layers blocks), so it learns
                        to *answer* about what it sees; the vision tower keeps learning if built-in
A pretrained tower from --vision_tower is frozen in both phases unless --train_tower.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dataset.chat_template import IMAGE
from model import MiniMindVLM, MiniMindVLMConfig, VisionConfig
from trainer.lib.stages import StageError

PARTS = ("vision_tower", "multi_modal_projector", "model")
PART_NAMES = {"vision_tower": "vision tower", "multi_modal_projector": "projector", "model": "language model"}


def tower_config(tower_dir: Path):
    """The vision config of a transformers SigLIP/CLIP *vision* model dir; CLIP keeps its CLS token."""
    config = AutoConfig.from_pretrained(tower_dir)
    if hasattr(config, "vision_config") and config.vision_config is not None:
        config = config.vision_config  # a dual encoder's dir: use its vision half's config
    if not hasattr(config, "patch_size") or not hasattr(config, "image_size"):
        raise StageError(f"--vision_tower {tower_dir}: {config.model_type!r} is not a ViT-style vision model "
                         f"(no patch_size/image_size); use a SigLIP or CLIP vision model dir")
    return config


def build_vlm(lm_dir: Path, tokenizer, vision: VisionConfig | None = None, tower_dir: Path | None = None) -> MiniMindVLM:
    """A VLM holding `lm_dir`'s LM weights exactly, with a fresh ViT (`vision`) or the pretrained tower
    at `tower_dir`, and a fresh projector."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise StageError(f"{lm_dir}: the tokenizer has no {IMAGE} token (it was trained before the VLM stage "
                         f"existed); retrain it with python trainer/train_0_tokenizer.py and the stages after it")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    if lm.config.vocab_size != len(tokenizer):
        raise StageError(f"{lm_dir}: the LM has {lm.config.vocab_size} embeddings but its tokenizer {len(tokenizer)} "
                         f"tokens; the checkpoint and tokenizer come from different runs")
    if tower_dir is not None:
        vision_config = tower_config(tower_dir)
        strategy = "default" if vision_config.model_type.startswith("clip") else "full"  # drop CLIP's CLS
    else:
        vision_config, strategy = vision or VisionConfig(), "full"
    config = MiniMindVLMConfig(text_config=lm.config.to_dict(), vision_config=vision_config.to_dict(),
                               image_token_id=image_token_id, vision_feature_select_strategy=strategy)
    vlm = MiniMindVLM(config)
    missing, unexpected = vlm.load_state_dict(lm.state_dict(), strict=False)
    lm_keys = [k for k in vlm.state_dict() if k.startswith(("model.", "lm_head."))]
    not_loaded = [k for k in missing if k.startswith(("model.", "lm_head."))]
    if unexpected or not_loaded:
        raise StageError(f"{lm_dir}: LM weights do not fit the VLM's language model "
                         f"(unexpected {unexpected[:3]}, not loaded {not_loaded[:3]})")
    vlm.tie_weights()
    if tower_dir is not None:
        tower = AutoModel.from_pretrained(tower_dir)
        tower = getattr(tower, "vision_model", tower) if hasattr(tower, "text_model") else tower
        vlm.vision_tower.load_state_dict(tower.state_dict())
        logger.info(f"vision tower: {type(tower).__name__} from {tower_dir}")
    logger.info(f"language model: loaded {len(lm_keys)} tensors from {lm_dir} (every LM weight; vision tower "
                f"and projector start fresh)")
    return vlm


def set_trainable(vlm: MiniMindVLM, phase: int, lm_layers: int = -1, train_tower: bool | None = None) -> None:
    """Freeze per phase (see the module docstring). `lm_layers` (phase 2): -1 = the whole LM, N = only
    its last N blocks and final norm. `train_tower`: None = train it only if it is the built-in ViT."""
    builtin = vlm.config.vision_config.model_type == "minimind_vision"
    tower = builtin if train_tower is None else train_tower
    for p in vlm.parameters():
        p.requires_grad_(False)
    vlm.multi_modal_projector.requires_grad_(True)
    vlm.vision_tower.requires_grad_(tower)
    if phase == 2:
        if lm_layers < 0:
            vlm.model.requires_grad_(True)  # embeddings (tied with lm_head) included
        else:
            n = len(vlm.model.layers)
            for layer in vlm.model.layers[max(0, n - lm_layers):]:
                layer.requires_grad_(True)
            vlm.model.norm.requires_grad_(lm_layers > 0)


def trainable_table(vlm: nn.Module) -> str:
    """`vision tower 0.41M / 0.41M trainable, projector ..., language model 0.00M / 3.2M` (tied counted once)."""
    seen, rows = set(), []
    for part in PARTS:
        total = trainable = 0
        for p in getattr(vlm, part).parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        rows.append(f"{PART_NAMES[part]} {trainable / 1e6:.2f}M / {total / 1e6:.2f}M")
    return "trainable: " + ", ".join(rows)
