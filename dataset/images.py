"""Images in, pixel tensors out: decoding, and the image processor a VLM checkpoint carries.

SigLIP's preprocessing, done by transformers' own `SiglipImageProcessorPil` (no torchvision needed):
    RGB -> resize to image_size x image_size (bicubic) -> x / 255 -> (x - 0.5) / 0.5, so pixels lie in [-1, 1].
The processor is saved with every VLM checkpoint (preprocessor_config.json), so chat, evaluation and
the Llava export all turn an image into exactly the pixels the model was trained on.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, SiglipImageProcessorPil
from transformers.image_processing_utils import BaseImageProcessor


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Encoded image bytes or a file path -> an RGB PIL image. Raises OSError/ValueError if unreadable."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else Path(data))
    image.load()
    return image.convert("RGB")


def blank_like(image: Image.Image) -> Image.Image:
    """An all-black image of the same size: the "no information" control for evaluation."""
    return Image.new("RGB", image.size)


def default_image_processor(image_size: int) -> BaseImageProcessor:
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def load_image_processor(model_dir: str | Path, image_size: int) -> BaseImageProcessor:
    """The processor saved in `model_dir` (a VLM checkpoint or a pretrained tower), else SigLIP's default."""
    if (Path(model_dir) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(model_dir)
    return default_image_processor(image_size)


def to_pixels(processor: BaseImageProcessor, images: list[Image.Image]) -> torch.Tensor:
    """[n_images, 3, S, S] float pixels for a list of PIL images."""
    return processor(images=images, return_tensors="pt")["pixel_values"]
