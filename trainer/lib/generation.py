"""Turning prompts into token ids, padding, and generating replies: the one body every stage,
evaluation, the sample callback, PPO's rollouts and scripts/test_chat.py share.

A prompt is a list of chat messages (rendered with the chat template, the assistant header
appended) or a plain string (tokenized as it is, for a pretrained model). Prompts are left-padded
so every row ends where generation continues; the completion comes back right-padded with a mask
that is 1 up to and including the first <|im_end|>.

Shapes: B prompts, P = longest prompt, C = longest completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Messages = list[dict[str, Any]]
Prompt = Messages | str
# Room for one worked demo answer: a two-step sum in columns ("23 + 45: 3 + 5 = 8; ...") plus
# "The answer is X." is ~100 tokens with one digit per token; a cut-off reply grades as wrong.
REPLY_TOKENS = 128


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """A chat prompt with the assistant header appended, or a plain string as it is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids [B, T] and attention mask [B, T] (1 = real token), padded on `side`
    ("left" for prompts about to be continued, "right" for whole sequences)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(list(r), dtype=torch.long), 1
    return ids, mask


def completion_mask_until_eos(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 for every token up to and including the first `eos_id`, 0 after: [B, C] -> (mask [B, C],
    finished [B])."""
    is_eos = completion_ids == eos_id
    eos_seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_seen_before == 0).long(), is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (the most likely token); otherwise
    sample from softmax(logits / temperature), after top_k (0 = off) and top_p (1 = off) cut the tail
    and repetition_penalty (> 1) damps tokens already present. PPO samples with top_k 0 and
    top_p 1, so the log-probabilities it computes later are those of the distribution that sampled."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


GREEDY = Sampling()


@dataclass
class Generation:
    """Prompts left-padded to P, completions right-padded to C.

    input_ids, attention_mask: [B, P + C]; completion_mask: [B, C] (1 up to and including the first
    <|im_end|>); finished: [B] (the completion ended with <|im_end|>); texts: the decoded completions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    finished: torch.Tensor
    prompt_length: int
    texts: list[str]

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    def select(self, idx: torch.Tensor) -> Generation:
        """The rows at `idx` (a minibatch)."""
        return Generation(self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx],
                          self.finished[idx], self.prompt_length, [self.texts[i] for i in idx.tolist()])


def _concat(parts: Sequence[Generation], pad_id: int) -> Generation:
    """Batches of different P and C -> one Generation (more left padding, more right padding)."""
    if not parts:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Generation(empty, empty, empty, torch.zeros(0, dtype=torch.bool), 0, [])
    if len(parts) == 1:
        return parts[0]
    P = max(g.prompt_length for g in parts)
    C = max(g.completion_mask.shape[1] for g in parts)
    ids, attn, comp = [], [], []
    for g in parts:
        left, right = P - g.prompt_length, C - g.completion_mask.shape[1]
        ids.append(torch.nn.functional.pad(g.input_ids, (left, right), value=pad_id))
        attn.append(torch.nn.functional.pad(g.attention_mask, (left, right), value=0))
        comp.append(torch.nn.functional.pad(g.completion_mask, (0, right), value=0))
    return Generation(torch.cat(ids), torch.cat(attn), torch.cat(comp), torch.cat([g.finished for g in parts]),
                      P, [t for g in parts for t in g.texts])


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling = GREEDY,
             batch_size: int | None = None, streamer=None, images: Sequence[Sequence[Any]] | None = None,
             image_processor: Any = None, **generate_kwargs: Any) -> Generation:
    """Replies to `prompts` with `model.generate()` and its KV cache, `batch_size` prompts at a time
    (None = all at once). The model is put in eval mode (no dropout) and restored afterwards.
    `streamer` (a transformers streamer, one prompt) receives the text as it is written;
    `generate_kwargs` go to `model.generate` as they are (min_new_tokens=...).
    A VLM also takes `images` (the PIL images of each prompt, one per `<image>`) and its
    `image_processor`: each `<image>` is expanded to the model's patch count and the pixels go along."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    if images is not None:
        from dataset.images import to_pixels
        from dataset.vlm import expand_image_tokens

        cfg = model.config
        encoded = [expand_image_tokens(e, cfg.image_token_id, cfg.image_seq_length) for e in encoded]
    step = batch_size or max(len(encoded), 1)
    parts = []
    for i in range(0, len(encoded), step):
        ids, mask = pad(encoded[i:i + step], tokenizer.pad_token_id, side="left")
        ids, mask = ids.to(device), mask.to(device)
        batch_images = [im for row in images[i:i + step] for im in row] if images is not None else []
        pixels = {"pixel_values": to_pixels(image_processor, batch_images).to(device)} if batch_images else {}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             streamer=streamer, **pixels, **sampling.generate_kwargs(), **generate_kwargs)
        completion = out[:, ids.shape[1]:]
        completion_mask, finished = completion_mask_until_eos(completion, tokenizer.eos_token_id)
        completion = torch.where(completion_mask.bool(), completion, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        parts.append(Generation(torch.cat([ids, completion], 1), torch.cat([mask, completion_mask], 1),
                                completion_mask, finished, ids.shape[1], texts))
    model.train(was_training)
    return _concat(parts, tokenizer.pad_token_id)
