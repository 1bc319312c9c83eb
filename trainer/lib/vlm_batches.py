"""VLM training batches: encoded samples with their images, padded together with their pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataset.images import decode_image, to_pixels
from dataset.vlm import encode_vlm
from trainer.lib.generation import pad


@dataclass
class VLMDataset(torch.utils.data.Dataset):
    """Records -> encoded samples with their decoded PIL images (pixels are made per batch)."""

    records: Sequence[dict]
    tokenizer: Any
    image_token_id: int
    n_image_tokens: int

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        sample = encode_vlm(self.tokenizer, rec["messages"], self.image_token_id, self.n_image_tokens)
        sample["images"] = [decode_image(b) for b in rec["images"]]
        return sample


@dataclass
class VLMCollator:
    """Right-pads a list of samples: input_ids/labels/attention_mask [B, T], pixel_values [n_images, 3, S, S]
    (every image of the batch, in sample order, which is the order the VLM splices them in)."""

    image_processor: Any
    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids, attention = pad([s["input_ids"] for s in samples], self.pad_token_id)
        labels, _ = pad([s["labels"] for s in samples], -100)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        images = [im for s in samples for im in s["images"]]
        if images:
            batch["pixel_values"] = to_pixels(self.image_processor, images)
        return batch
