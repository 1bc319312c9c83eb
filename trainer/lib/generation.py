"""Turning prompts into token ids, padding, and generating replies: the one body every stage,
evaluation, the sample callback, PPO's rollouts and scripts/test_chat.py share.

A prompt is a list of chat messages (rendered with the chat template, the assistant header
appended) or a plain string (tokenized as it is, for a pretrained model). Prompts are left-padded
so every row ends where generation continues; the completion comes back right-padded with a mask
that is 1 up to and including the first <|im_end|>.

Shapes: B prompts, P = longest prompt, C = longest completion.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class TokenChoice:
    """One generated token: its text, the probability the model gave it, and the `k` most likely
    tokens at that position with theirs (the model's own distribution, softmax at temperature 1)."""

    text: str
    prob: float
    rank: int  # 0: the most likely token, the one greedy decoding picks; 1: the runner-up; ...
    top: list[tuple[str, float]]


@torch.no_grad()
def token_choices(model, tokenizer, gen: Generation, row: int = 0, k: int = 5) -> list[TokenChoice]:
    """Per generated token of row `row`: p(token | everything before) and the top-k alternatives.

    One forward pass over prompt + completion: the logits at position t predict token t + 1, so the
    completion's tokens P..P+C-1 are read from positions P-1..P+C-2."""
    n = int(gen.completion_mask[row].sum())
    if n == 0:
        return []
    ids = gen.input_ids[row: row + 1, : gen.prompt_length + n]
    mask = gen.attention_mask[row: row + 1, : gen.prompt_length + n]
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=position_ids_from_mask(mask).to(device)).logits[0]
    probs = torch.softmax(logits[gen.prompt_length - 1: gen.prompt_length + n - 1].float(), dim=-1)  # [n, V]
    chosen = ids[0, gen.prompt_length:].to(device)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    decode = lambda i: tokenizer.decode([int(i)])
    ranks = (probs > probs.gather(1, chosen[:, None])).sum(dim=1)
    return [TokenChoice(decode(tok), float(probs[t, tok]), int(ranks[t]),
                        [(decode(i), float(p)) for i, p in zip(top_i[t], top_p[t])])
            for t, tok in enumerate(chosen)]


@dataclass(frozen=True)
class StreamedToken:
    """One token as `stream_tokens` yields it: its id, the text it adds to the reply (may be "" while a
    multi-byte character is incomplete), its log-probability and the `top` alternatives' (the model's
    distribution before temperature / top-p: what an OpenAI `logprobs` field reports)."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, float]]


def stream_tokens(model, tokenizer, prompt: Prompt, max_new_tokens: int, sampling: Sampling = GREEDY,
                  top_logprobs: int = 0, cancel: Any = None,
                  logit_bias: dict[int, float] | None = None) -> Iterator[StreamedToken]:
    """Generate a reply to one prompt and yield it token by token as it is decoded.

    `model.generate` runs in a thread; a logits processor (which transformers applies before the
    temperature and top-p warpers) records each step's log-softmax, and a streamer hands over each
    chosen token. `cancel` (a threading.Event) stops the generation at the next step: a server
    sets it when the client goes away. `logit_bias` {token id: b} adds b to that token's logit before
    sampling (OpenAI's field: -100 bans a token); the recorded log-probabilities are the unbiased
    model's. Stops at <|im_end|> (which is not yielded)."""
    import queue
    import threading

    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    cancel = cancel or threading.Event()
    steps: queue.Queue = queue.Queue()
    dists: list[torch.Tensor] = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            dists.append(torch.log_softmax(scores[0].float(), dim=-1))
            for token, bias in (logit_bias or {}).items():
                scores[:, token] += bias
            return scores

    class Hand(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            steps.put(int(value.reshape(-1)[0]))

        def end(self) -> None:
            steps.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=next(model.parameters()).device)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               streamer=Hand(), logits_processor=LogitsProcessorList([Record()]),
                               stopping_criteria=StoppingCriteriaList([Cancelled()]), **sampling.generate_kwargs())
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
            steps.put(None)

    was_training = model.training
    model.eval()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    generated: list[int] = []
    shown = ""
    try:
        while (token := steps.get()) is not None:
            if token == tokenizer.eos_token_id:
                continue
            dist = dists[len(generated)]
            generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            piece = "" if text.endswith("\ufffd") else text[len(shown):]  # wait for a whole character
            shown += piece
            top = [(int(i), float(v)) for v, i in zip(*dist.topk(top_logprobs))] if top_logprobs else []
            yield StreamedToken(token, piece, float(dist[token]), top)
    finally:
        cancel.set()  # the consumer stopped early (or we are done): let generate() finish its step
        thread.join()
        model.train(was_training)
    if failure:
        raise failure[0]
