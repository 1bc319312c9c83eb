"""Measuring a checkpoint: the metric functions, and a registry of evaluation tasks built on them.

Metrics (each a plain function of a model, a tokenizer and data, so stages and tests call them too):

- `perplexity`: exp of the mean next-token cross-entropy over held-out documents,
  ppl = exp( sum_d sum_t -log p(x_t | x_<t) / number of predicted tokens ). Each document is followed
  by <|im_end|> (the pretraining separator) and cut at `max_length` tokens.
- `answer_accuracy`: greedy-decode a reply to every prompt, then grade it with `trainer.answers.is_correct`
  (final-answer extraction + math-verify), the one grading rule of the course.
  accuracy = #correct / n; `answered` = share of replies that state a final answer at all.
- `completion_logprobs`: log pi(y | x) = sum over the completion's tokens of log p(y_t | x, y_<t),
  with x and y rendered by the chat template exactly as trl's DPOTrainer renders them.
- `preference_accuracy`: the implicit DPO reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x));
  accuracy = share of pairs with r(chosen) > r(rejected), a tie counting 1/2 (so a model measured
  against itself scores 0.5, chance, not 0).
- `loglik_accuracy`: the same comparison without a reference: log pi(chosen|x) > log pi(rejected|x).

Tasks (`TASKS`, run by `scripts/evaluate.py`): a name -> a function of an `EvalRequest` returning a dict
of metrics, plus the demo file it reads when no `--data` is given. Add one with `@register_task`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.answers import final_answer, is_correct
from trainer.common import STAGES, StageError, resolve_stage_or_path, stage_output

Messages = list[dict[str, Any]]


# ----------------------------------------------------------------------------- loading

def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a checkpoint dir, in eval mode."""
    import model as _registers_minimind  # noqa: F401  (Auto-class registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return lm, tokenizer


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask (1 = real token), padded on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        else:
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean NLL (nats) over documents and its exp. Returns {"loss", "ppl", "tokens"}."""
    docs = [(tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id])[:max_length] for t in texts]
    docs = [d for d in docs if len(d) > 1]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(docs), batch_size):
        ids, mask = _pad(docs[i:i + batch_size], tokenizer.pad_token_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int = 48,
                     batch_size: int = 32) -> list[str]:
    """Greedy replies to chat prompts, decoded in left-padded batches (the KV cache does the rest)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies: list[str] = []
    encoded = [chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]
    for i in range(0, len(encoded), batch_size):
        ids, mask = _pad(encoded[i:i + batch_size], tokenizer.pad_token_id, "left")
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return replies


def answer_accuracy(model, tokenizer, prompts: Sequence[Messages], golds: Sequence[Sequence[str]],
                    max_new_tokens: int = 48, batch_size: int = 32) -> dict[str, Any]:
    """Greedy replies graded by `is_correct`. Returns accuracy, answered share, n and a few examples."""
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = [is_correct(r, g) for r, g in zip(replies, golds)]
    n = max(len(replies), 1)
    return {
        "accuracy": sum(correct) / n,
        "answered": sum(final_answer(r) is not None for r in replies) / n,
        "n": len(replies),
        "examples": [{"prompt": p[-1]["content"], "reply": r, "gold": list(g), "correct": c}
                     for p, r, g, c in list(zip(prompts, replies, golds, correct))[:3]],
    }


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: Sequence[Messages], completions: Sequence[Messages],
                        batch_size: int = 16) -> torch.Tensor:
    """[N] summed log pi(completion | prompt) over the completion's tokens.

    The completion starts where the rendered prompt (with the assistant header) and the rendered
    prompt + completion stop agreeing, as in trl's DPOTrainer; it includes the closing <|im_end|>\\n.
    """
    device = next(model.parameters()).device
    rows, starts = [], []
    for p, c in zip(prompts, completions):
        prompt_ids, full = chat_ids(tokenizer, p, add_generation_prompt=True), chat_ids(tokenizer, p + c)
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
        rows.append(full)
        starts.append(start)
    out = []
    for i in range(0, len(rows), batch_size):
        ids, mask = _pad(rows[i:i + batch_size], tokenizer.pad_token_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logps = logps.gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]: log p(x_{t+1} | x_<=t)
        pos = torch.arange(ids.shape[1] - 1, device=device)[None]
        first = torch.tensor(starts[i:i + batch_size], device=device)[:, None] - 1
        keep = (pos >= first) & (mask[:, 1:] == 1)
        out.append((token_logps * keep).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float = 0.1) -> dict[str, float]:
    """Implicit DPO rewards r = beta * (log pi - log pi_ref), all inputs [N] summed log-probs.

    accuracy = mean(1[r_c > r_r] + 0.5 * 1[r_c == r_r]); margin = mean(r_c - r_r)."""
    r_c, r_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    wins = (r_c > r_r).float() + 0.5 * (r_c == r_r).float()
    return {"accuracy": wins.mean().item(), "margin": (r_c - r_r).mean().item(),
            "reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item()}


def loglik_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Share of pairs where log pi(chosen|x) > log pi(rejected|x) (ties 1/2), and the mean gap."""
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {"accuracy": wins.mean().item(), "logp_gap": (chosen - rejected).mean().item()}


# ----------------------------------------------------------------------------- data

def read_kind(path: Path) -> str:
    """"rl" when the first record has a `gt` key, "dpo" when it has `chosen`, else "chat"."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return "chat"  # load_records will report the bad line with its number
    return "rl" if "gt" in obj else "dpo" if "chosen" in obj else "chat"


def answer_items(path: Path, limit: int | None) -> tuple[list[Messages], list[list[str]]]:
    """(prompts, reference answers). Chat files: the turns before the last assistant turn and
    final_answer(last assistant turn), records without one skipped. RL files: prompt and `gt`."""
    from dataset.jsonl import load_records

    prompts, golds = [], []
    if read_kind(path) == "rl":
        for r in load_records(path, "rl"):
            if r["gt"]:
                prompts.append(r["prompt"])
                golds.append(r["gt"])
    else:
        for r in load_records(path, "chat"):
            msgs = r["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            gold = final_answer(msgs[last]["content"]) if last is not None else None
            if gold is not None and last > 0:
                prompts.append(msgs[:last])
                golds.append([gold])
    if limit:
        prompts, golds = prompts[:limit], golds[:limit]
    if not prompts:
        raise StageError(f"{path}: no record with a reference answer (a 'The answer is X.' line or 'gt')")
    return prompts, golds


# ----------------------------------------------------------------------------- tasks

@dataclass
class EvalRequest:
    """What a task needs: the model dir, the data, and the knobs of scripts/evaluate.py."""

    stage: str                 # --stage as given (a stage name or a path)
    model_dir: Path            # resolved checkpoint dir
    data: Path
    out_dir: Path
    limit: int | None = None
    ref: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    max_new_tokens: int = 48
    max_length: int = 256
    beta: float = 0.1
    reward_model: str | None = None  # rm_score: a stage name or model dir (default: the reward stage)


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[EvalRequest], dict[str, Any]]
    default_data: str          # demo file used without --data (a key of dataset.demo.write_demo_data)
    help: str


TASKS: dict[str, Task] = {}


def register_task(name: str, default_data: str, help: str) -> Callable:
    """Decorator: `@register_task("math_acc", "rl_eval", "...")` on a function EvalRequest -> metrics."""
    def wrap(fn: Callable[[EvalRequest], dict[str, Any]]) -> Callable[[EvalRequest], dict[str, Any]]:
        TASKS[name] = Task(name, fn, default_data, help)
        return fn
    return wrap


def stage_of(req: EvalRequest) -> tuple[str | None, Path]:
    """(stage name, out_dir) of the evaluated model: --stage itself, or the folder a checkpoint lies in."""
    if req.stage in STAGES:
        return req.stage, req.out_dir
    parent = req.model_dir.parent
    return (parent.name, parent.parent) if parent.name in STAGES else (None, req.out_dir)


def resolve_ref(req: EvalRequest) -> Path:
    """--ref, else the parent stage of the evaluated stage (dpo -> sft)."""
    if req.ref:
        return resolve_stage_or_path(req.ref, req.out_dir, flag="--ref")
    stage, out_dir = stage_of(req)
    parent = STAGES[stage].parent if stage else None
    if parent is None or parent == "tokenizer":
        raise StageError(f"--ref: cannot tell the reference model of {req.stage}; pass --ref STAGE_OR_PATH")
    path = stage_output(out_dir, parent)
    if path is None:
        raise StageError(f"--ref: the reference of {req.stage} is the {parent} stage, but {out_dir / parent} has no "
                         f"checkpoint. Create it with: python {STAGES[parent].script}"
                         + ("" if str(out_dir) == "training" else f" --out_dir {out_dir}"))
    return path


@register_task("ppl", "pretrain_eval", "held-out perplexity on plain text")
def task_ppl(req: EvalRequest) -> dict[str, Any]:
    from dataset.jsonl import load_records

    texts = [r["text"] for r in load_records(req.data, "pretrain", limit=req.limit)]
    lm, tok = load_model(req.model_dir, req.device)
    m = perplexity(lm, tok, texts, req.max_length, req.batch_size)
    return {"n": len(texts), "ppl": m["ppl"], "loss": m["loss"], "tokens": m["tokens"]}


def _greedy_accuracy(req: EvalRequest, key: str) -> dict[str, Any]:
    prompts, golds = answer_items(req.data, req.limit)
    lm, tok = load_model(req.model_dir, req.device)
    m = answer_accuracy(lm, tok, prompts, golds, req.max_new_tokens, max(req.batch_size, 32))
    return {"n": m["n"], key: m["accuracy"], "answered": m["answered"], "examples": m["examples"]}


@register_task("answer_acc", "sft_eval", "greedy chat answers graded by trainer.answers.is_correct")
def task_answer_acc(req: EvalRequest) -> dict[str, Any]:
    return _greedy_accuracy(req, "answer_acc")


def _pair_logprobs(req: EvalRequest, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from dataset.jsonl import load_records

    pairs = load_records(req.data, "dpo", limit=req.limit)
    lm, tok = load_model(model_dir, req.device)
    prompts = [p["prompt"] for p in pairs]
    return (completion_logprobs(lm, tok, prompts, [p["chosen"] for p in pairs], req.batch_size),
            completion_logprobs(lm, tok, prompts, [p["rejected"] for p in pairs], req.batch_size))


@register_task("pref_acc", "dpo_eval", "share of pairs whose implicit DPO reward (vs --ref) prefers chosen")
def task_pref_acc(req: EvalRequest) -> dict[str, Any]:
    ref_dir = resolve_ref(req)
    chosen, rejected = _pair_logprobs(req, req.model_dir)
    same = ref_dir.resolve() == req.model_dir.resolve()
    ref_chosen, ref_rejected = (chosen, rejected) if same else _pair_logprobs(req, ref_dir)
    m = preference_accuracy(chosen, rejected, ref_chosen, ref_rejected, req.beta)
    return {"n": len(chosen), "pref_acc": m["accuracy"], "reward_margin": m["margin"],
            "reward_chosen": m["reward_chosen"], "reward_rejected": m["reward_rejected"],
            "ref": str(ref_dir), "beta": req.beta}


@register_task("loglik_acc", "dpo_eval", "share of pairs where the model gives chosen a higher log-likelihood")
def task_loglik_acc(req: EvalRequest) -> dict[str, Any]:
    chosen, rejected = _pair_logprobs(req, req.model_dir)
    m = loglik_accuracy(chosen, rejected)
    return {"n": len(chosen), "loglik_acc": m["accuracy"], "logp_gap": m["logp_gap"]}


def evaluate(req: EvalRequest, task: str) -> dict[str, Any]:
    """Run one registered task; the result starts with stage, task and n."""
    if task not in TASKS:
        raise StageError(f"--task {task}: unknown task; choose one of {', '.join(TASKS)}")
    metrics = TASKS[task].run(req)
    return {"stage": req.stage, "task": task, "n": metrics.pop("n"), **metrics}


# ----------------------------------------------------------------------------- RL tasks (stages 4-6)

def load_reward_model(path: str | Path, device: str = "cpu"):
    """A num_labels=1 sequence classifier (stage 5's reward model) and its tokenizer, in eval mode."""
    import model as _registers_minimind  # noqa: F401  (Auto-class registration)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval(),
            AutoTokenizer.from_pretrained(path))


@register_task("math_acc", "rl_eval", "greedy answers to RL prompts graded against `gt` by trainer.answers.is_correct")
def task_math_acc(req: EvalRequest) -> dict[str, Any]:
    return _greedy_accuracy(req, "math_acc")


@register_task("rm_acc", "dpo_eval", "reward model (--stage reward): share of pairs with r(chosen) > r(rejected)")
def task_rm_acc(req: EvalRequest) -> dict[str, Any]:
    from dataset.jsonl import load_records
    from trainer.ppo import pairwise_accuracy, score_with_reward_model

    pairs = load_records(req.data, "dpo", limit=req.limit)
    rm, tok = load_reward_model(req.model_dir, req.device)
    prompts = [p["prompt"] for p in pairs]
    chosen = score_with_reward_model(rm, tok, prompts, [p["chosen"][-1]["content"] for p in pairs], req.batch_size)
    rejected = score_with_reward_model(rm, tok, prompts, [p["rejected"][-1]["content"] for p in pairs], req.batch_size)
    return {"n": len(pairs), "rm_acc": pairwise_accuracy(chosen, rejected),
            "margin": (chosen - rejected).mean().item(), "score_chosen": chosen.mean().item(),
            "score_rejected": rejected.mean().item()}


@register_task("rm_score", "rl_eval", "mean reward-model score (--reward_model, default: the reward stage) "
                                      "of the model's greedy answers")
def task_rm_score(req: EvalRequest) -> dict[str, Any]:
    from dataset.jsonl import load_records
    from trainer.ppo import score_with_reward_model

    kind = read_kind(req.data)
    records = load_records(req.data, kind if kind != "chat" else "chat", limit=req.limit)
    prompts = [r["prompt"] if kind != "chat" else r["messages"][:-1] for r in records]
    lm, tok = load_model(req.model_dir, req.device)
    replies = generate_replies(lm, tok, prompts, req.max_new_tokens, max(req.batch_size, 32))
    rm_path = resolve_stage_or_path(req.reward_model or "reward", req.out_dir, flag="--reward_model")
    rm, rm_tok = load_reward_model(rm_path, req.device)
    scores = score_with_reward_model(rm, rm_tok, prompts, replies, req.batch_size)
    return {"n": len(prompts), "rm_score": scores.mean().item(), "rm_score_std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward_model": str(rm_path),
            "examples": [{"prompt": p[-1]["content"], "reply": r, "score": s}
                         for p, r, s in list(zip(prompts, replies, scores.tolist()))[:3]]}
