"""Measuring a model on held-out data: plain functions of a model, a tokenizer and data, called by
the stages (before and after training), by the evaluation tasks of scripts/evaluate.py and by tests.

- `perplexity`: exp of the mean next-token cross-entropy over held-out documents,
  ppl = exp( sum_d sum_t -log p(x_t | x_<t) / number of predicted tokens ). Each document is followed
  by <|im_end|> (the pretraining separator) and cut at `max_length` tokens.
- `answer_accuracy`: greedy-decode a reply to every prompt, then `grading.grade` it (final-answer
  extraction + math-verify). accuracy = #correct / n; answered = share that state a final answer;
  stderr = sqrt(p (1 - p) / n); by_skill = the same accuracy per demo skill (`dataset.demo.skill_of`).
- `completion_logprobs`: log pi(y | x) = sum over the completion's tokens of log p(y_t | x, y_<t),
  with x and y rendered by the chat template exactly as trl's DPOTrainer renders them.
- `pairwise_accuracy`: the share of pairs whose first score beats the second,
  mean(1[a > b] + 1/2 * 1[a == b]). A tie counts one half, so a constant scorer (or a model measured
  against itself) sits at 0.5, chance. Every pairwise figure of the course uses it: the implicit DPO
  reward (`preference_accuracy`), log-likelihoods (`loglik_accuracy`) and reward-model scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dataset.demo import skill_of
from trainer.lib.generation import GREEDY, REPLY_TOKENS, Messages, chat_ids, generate, pad
from trainer.lib.grading import final_answer, grade
from trainer.lib.stages import StageError


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a checkpoint dir, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model as _registers_minimind  # noqa: F401  (Auto-class registration)

    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return lm, tokenizer


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean NLL (nats) over documents and its exp. Returns {"loss", "ppl", "tokens"}."""
    docs = [(tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id])[:max_length] for t in texts]
    docs = [d for d in docs if len(d) > 1]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(docs), batch_size):
        ids, mask = pad(docs[i:i + batch_size], tokenizer.pad_token_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def binomial_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of an accuracy p measured on n independent questions:
    at n = 200 and p = 0.3 it is 0.032, so a 3-point change is within noise."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def accuracy_by_skill(prompts: Sequence[Messages], correct: Sequence[bool]) -> dict[str, dict[str, float]]:
    """{skill: {"n", "accuracy"}} by `dataset.demo.skill_of` of each prompt's last user message;
    empty when no prompt is a demo question (real data)."""
    groups: dict[str, list[bool]] = {}
    for p, c in zip(prompts, correct):
        groups.setdefault(skill_of(p[-1]["content"]), []).append(bool(c))
    if set(groups) <= {"other"}:
        return {}
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def answer_accuracy(model, tokenizer, prompts: Sequence[Messages], golds: Sequence[Sequence[str]],
                    max_new_tokens: int = REPLY_TOKENS, batch_size: int = 32) -> dict[str, Any]:
    """Greedy replies graded by `grading.grade`. Returns accuracy, answered share, n, the replies and
    a few examples."""
    replies = generate(model, tokenizer, prompts, max_new_tokens, GREEDY, batch_size).texts
    g = grade(replies, golds)
    return {
        "accuracy": g["accuracy"], "stderr": binomial_stderr(g["accuracy"], g["n"]), "answered": g["answered"],
        "n": g["n"], "by_skill": accuracy_by_skill(prompts, g["correct"]), "replies": replies,
        "examples": [{"prompt": p[-1]["content"], "reply": r, "gold": list(gold), "correct": c}
                     for p, r, gold, c in list(zip(prompts, replies, golds, g["correct"]))[:3]],
    }


def logged_answer_accuracy(model, tokenizer, prompts: Sequence[Messages], golds: Sequence[Sequence[str]],
                           max_new_tokens: int = REPLY_TOKENS) -> float:
    """`answer_accuracy`, with one log line (accuracy +- its standard error, answered share, by skill)."""
    from loguru import logger

    acc = answer_accuracy(model, tokenizer, prompts, golds, max_new_tokens)
    skills = ", ".join(f"{k} {v['accuracy']:.0%} of {v['n']}" for k, v in acc["by_skill"].items())
    logger.info(f"held-out answer accuracy (greedy, {acc['n']} conversations): {acc['accuracy']:.1%} "
                f"+- {acc['stderr']:.1%} ({acc['answered']:.0%} state an answer)" + (f"; by skill: {skills}" if skills else ""))
    return acc["accuracy"]


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: Sequence[Messages], completions: Sequence[Messages],
                        batch_size: int = 16) -> torch.Tensor:
    """[N] summed log pi(completion | prompt) over the completion's tokens.

    The completion starts where the rendered prompt (with the assistant header) and the rendered
    prompt + completion stop agreeing, as in trl's DPOTrainer; it includes the closing <|im_end|>\\n.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, starts = [], []
    for p, c in zip(prompts, completions):
        prompt, full = chat_ids(tokenizer, p, add_generation_prompt=True), chat_ids(tokenizer, p + c)
        start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        rows.append(full)
        starts.append(start)
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask = pad(rows[i:i + batch_size], tokenizer.pad_token_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logps = logps.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]: log p(x_{t+1} | x_<=t)
        pos = torch.arange(ids.shape[1] - 1, device=device)[None]
        first = torch.tensor(starts[i:i + batch_size], device=device)[:, None] - 1
        keep = (pos >= first) & (mask[:, 1:] == 1)
        out.append((token_logps * keep).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(first: torch.Tensor, second: torch.Tensor) -> float:
    """mean(1[first > second] + 1/2 * 1[first == second]) over [N] pairs; nan for N = 0."""
    if len(first) == 0:
        return float("nan")
    return ((first > second).float() + 0.5 * (first == second).float()).mean().item()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float = 0.1) -> dict[str, float]:
    """Implicit DPO rewards r = beta * (log pi - log pi_ref), all inputs [N] summed log-probs.

    accuracy = pairwise_accuracy(r_c, r_r); margin = mean(r_c - r_r)."""
    r_c, r_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return {"accuracy": pairwise_accuracy(r_c, r_r), "margin": (r_c - r_r).mean().item(),
            "reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item()}


def loglik_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """pairwise_accuracy(log pi(chosen|x), log pi(rejected|x)) and the mean gap, without a reference."""
    return {"accuracy": pairwise_accuracy(chosen, rejected), "logp_gap": (chosen - rejected).mean().item()}


def pair_logprobs(model, tokenizer, pairs: Sequence[dict], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(chosen | prompt), log pi(rejected | prompt)) for preference records, [N] each."""
    prompts = [p["prompt"] for p in pairs]
    return (completion_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size),
            completion_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size))


def read_kind(path: Path) -> str:
    """"rl" when the first record has a `gt` key, "dpo" when it has `chosen`, else "chat"."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return "chat"  # load_records will report the bad line with its number
    return "rl" if "gt" in obj else "dpo" if "chosen" in obj else "chat"


def chat_answer_items(conversations: Sequence[Messages]) -> tuple[list[Messages], list[list[str]]]:
    """(prompts, reference answers) from conversations: the turns before the last assistant turn,
    and final_answer(last assistant turn); conversations without one are left out."""
    prompts, golds = [], []
    for msgs in conversations:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        gold = final_answer(msgs[last]["content"]) if last is not None else None
        if gold is not None and last > 0:
            prompts.append(msgs[:last])
            golds.append([gold])
    return prompts, golds


def answer_items(path: Path, limit: int | None) -> tuple[list[Messages], list[list[str]]]:
    """(prompts, reference answers) of a file. Chat files: `chat_answer_items`. RL files: prompt and `gt`."""
    from dataset.jsonl import load_records

    if read_kind(path) == "rl":
        rows = [r for r in load_records(path, "rl") if r["gt"]]
        prompts, golds = [r["prompt"] for r in rows], [r["gt"] for r in rows]
    else:
        prompts, golds = chat_answer_items([r["messages"] for r in load_records(path, "chat")])
    if limit:
        prompts, golds = prompts[:limit], golds[:limit]
    if not prompts:
        raise StageError(f"{path}: no record with a reference answer (a 'The answer is X.' line or 'gt')")
    return prompts, golds


def same_answer(reply: str, gold: str) -> bool:
    """Short VLM answers match when equal after case, surrounding space and a final period are ignored."""
    def norm(text: str) -> str:
        return " ".join(text.strip().lower().rstrip(".!").split())

    return norm(reply) == norm(gold)


def vlm_accuracy(model, tokenizer, image_processor, records: Sequence[dict], blank: bool = False,
                 max_new_tokens: int = 16, batch_size: int = 32) -> dict[str, Any]:
    """Greedy replies of a VLM to held-out image questions (records of `dataset.vlm`: the last turn is
    the reference answer), matched with `same_answer`. `blank`: every image replaced by a black one
    of the same size, the control that shows how much the answer depends on the image.
    Returns accuracy, stderr, n, by_kind (`dataset.demo_vision.question_kind`, demo questions) and examples."""
    from dataset.demo_vision import question_kind
    from dataset.images import blank_like, decode_image

    prompts, golds, images = [], [], []
    for rec in records:
        msgs = rec["messages"]
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            continue
        prompts.append(msgs[:-1])
        golds.append(msgs[-1]["content"])
        pics = [decode_image(b) for b in rec["images"]]
        images.append([blank_like(p) for p in pics] if blank else pics)
    if not prompts:
        raise StageError("no held-out record ends with an assistant answer to compare against")
    replies = generate(model, tokenizer, prompts, max_new_tokens, GREEDY, batch_size,
                       images=images, image_processor=image_processor).texts
    correct = [same_answer(r, g) for r, g in zip(replies, golds)]
    groups: dict[str, list[bool]] = {}
    for p, c in zip(prompts, correct):
        groups.setdefault(question_kind(p[-1]["content"]), []).append(c)
    accuracy = sum(correct) / len(correct)
    return {
        "accuracy": accuracy, "stderr": binomial_stderr(accuracy, len(correct)), "n": len(correct),
        "by_kind": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())},
        "examples": [{"prompt": p[-1]["content"], "reply": r, "gold": g, "correct": c}
                     for p, r, g, c in list(zip(prompts, replies, golds, correct))[:3]],
    }
