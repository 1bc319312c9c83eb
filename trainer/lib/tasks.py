"""The evaluation tasks of scripts/evaluate.py: a name -> a function of an `EvalRequest` returning a
dict of metrics, plus the demo file it reads when no `--data` is given. Each task is a thin wrapper
around `trainer.lib.metrics` (the same functions the stages call before and after training).
Add one with `@register_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset.jsonl import load_records
from trainer.lib.generation import GREEDY, REPLY_TOKENS, generate
from trainer.lib.metrics import (answer_accuracy, answer_items, load_model, loglik_accuracy, pair_logprobs,
                                 pairwise_accuracy, perplexity, preference_accuracy, read_kind)
from trainer.lib.reward_model import load_reward_model, pair_scores, reward_scores
from trainer.lib.stages import (STAGES, StageError, creating_command, resolve_model, resolve_stage_or_path,
                                 stage_output)


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
    max_new_tokens: int = REPLY_TOKENS
    max_length: int = 256
    beta: float = 0.1
    reward_model: str | None = None  # rm_score: a stage name or model dir (default: the reward stage)
    image_dir: Path | None = None    # vlm_acc: folder of a jsonl's images


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[EvalRequest], dict[str, Any]]
    default_data: str          # demo file used without --data (a key of write_demo_data / write_vlm_demo_data)
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
                         f"checkpoint. Create it with: {creating_command(parent, out_dir)}")
    return path


@register_task("ppl", "pretrain_eval", "held-out perplexity on plain text")
def task_ppl(req: EvalRequest) -> dict[str, Any]:
    texts = [r["text"] for r in load_records(req.data, "pretrain", limit=req.limit)]
    lm, tok = load_model(req.model_dir, req.device)
    m = perplexity(lm, tok, texts, req.max_length, req.batch_size)
    return {"n": len(texts), "ppl": m["ppl"], "loss": m["loss"], "tokens": m["tokens"]}


def _answer_accuracy(req: EvalRequest, key: str) -> dict[str, Any]:
    prompts, golds = answer_items(req.data, req.limit)
    lm, tok = load_model(req.model_dir, req.device)
    m = answer_accuracy(lm, tok, prompts, golds, req.max_new_tokens, max(req.batch_size, 32))
    return {"n": m["n"], key: m["accuracy"], "stderr": m["stderr"], "answered": m["answered"],
            "by_skill": m["by_skill"], "examples": m["examples"]}


@register_task("answer_acc", "sft_eval", "greedy chat answers graded by trainer.lib.grading.is_correct")
def task_answer_acc(req: EvalRequest) -> dict[str, Any]:
    return _answer_accuracy(req, "answer_acc")


@register_task("math_acc", "rl_eval", "greedy answers to RL prompts graded against `gt` by trainer.lib.grading.is_correct")
def task_math_acc(req: EvalRequest) -> dict[str, Any]:
    return _answer_accuracy(req, "math_acc")


def _pair_logprobs(req: EvalRequest, model_dir: Path):
    pairs = load_records(req.data, "dpo", limit=req.limit)
    lm, tok = load_model(model_dir, req.device)
    return pair_logprobs(lm, tok, pairs, req.batch_size)


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


def _load_rm(path: Path, device: str):
    from transformers import AutoTokenizer

    return load_reward_model(path).to(device).eval(), AutoTokenizer.from_pretrained(path)


@register_task("rm_acc", "reward_eval", "reward model (--stage reward): share of pairs with r(chosen) > r(rejected)")
def task_rm_acc(req: EvalRequest) -> dict[str, Any]:
    pairs = load_records(req.data, "dpo", limit=req.limit)
    rm, tok = _load_rm(req.model_dir, req.device)
    chosen, rejected = pair_scores(rm, tok, pairs, req.batch_size)
    return {"n": len(pairs), "rm_acc": pairwise_accuracy(chosen, rejected),
            "margin": (chosen - rejected).mean().item(), "score_chosen": chosen.mean().item(),
            "score_rejected": rejected.mean().item()}


@register_task("rm_score", "rl_eval", "mean reward-model score (--reward_model, default: the reward stage) "
                                      "of the model's greedy answers")
def task_rm_score(req: EvalRequest) -> dict[str, Any]:
    kind = read_kind(req.data)
    records = load_records(req.data, kind, limit=req.limit)
    prompts = [r["prompt"] if kind != "chat" else r["messages"][:-1] for r in records]
    lm, tok = load_model(req.model_dir, req.device)
    replies = generate(lm, tok, prompts, req.max_new_tokens, GREEDY, max(req.batch_size, 32)).texts
    rm_path = resolve_model(req.reward_model or "reward", req.out_dir, "reward", flag="--reward_model")
    rm, rm_tok = _load_rm(rm_path, req.device)
    scores = reward_scores(rm, rm_tok, prompts, replies, req.batch_size)
    return {"n": len(prompts), "rm_score": scores.mean().item(),
            "rm_score_std": scores.std().item() if len(scores) > 1 else 0.0, "reward_model": str(rm_path),
            "examples": [{"prompt": p[-1]["content"], "reply": r, "score": s}
                         for p, r, s in list(zip(prompts, replies, scores.tolist()))[:3]]}


@register_task("vlm_acc", "vlm_qa_eval", "VLM (--stage vlm): greedy one-word answers about each image, and "
                                        "the same questions with a black image")
def task_vlm_acc(req: EvalRequest) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    import model  # noqa: F401  (registers the VLM with the Auto classes)
    from dataset.images import load_image_processor
    from dataset.jsonl import DataError
    from dataset.vlm import load_vlm_records
    from trainer.lib.metrics import vlm_accuracy

    try:
        records = load_vlm_records(req.data, req.image_dir)[: req.limit]
    except DataError as e:
        raise StageError(str(e)) from e
    model_type = AutoConfig.from_pretrained(req.model_dir).model_type
    if model_type != "minimind_vlm":
        raise StageError(f"--stage {req.stage}: {req.model_dir} holds a {model_type!r} model, not a "
                         f"MiniMind VLM (train one with python trainer/train_7_vlm.py)")
    vlm = AutoModelForImageTextToText.from_pretrained(req.model_dir).to(req.device).eval()
    tok = AutoTokenizer.from_pretrained(req.model_dir)
    processor = load_image_processor(req.model_dir, vlm.config.vision_config.image_size)
    real = vlm_accuracy(vlm, tok, processor, records, batch_size=max(req.batch_size, 32))
    blank = vlm_accuracy(vlm, tok, processor, records, blank=True, batch_size=max(req.batch_size, 32))
    return {"n": real["n"], "vlm_acc": real["accuracy"], "stderr": real["stderr"],
            "vlm_acc_blank_image": blank["accuracy"], "by_kind": real["by_kind"],
            "by_kind_blank_image": blank["by_kind"], "examples": real["examples"]}


def evaluate(req: EvalRequest, task: str) -> dict[str, Any]:
    """Run one registered task; the result starts with stage, task and n."""
    if task not in TASKS:
        raise StageError(f"--task {task}: unknown task; choose one of {', '.join(TASKS)}")
    metrics = TASKS[task].run(req)
    return {"stage": req.stage, "task": task, "n": metrics.pop("n"), **metrics}
