"""Grading: reading a model's final answer, checking it against a reference, and the rule rewards
built on that check. The one place this is done: SFT accuracy, the GRPO and PPO rewards and every
evaluation call `is_correct`, so a model is never graded by two different rules.

Answers are found in this order: the course's "The answer is X." line, the last `\\boxed{X}`,
GSM8K's "#### X". Equality is exact text after light normalisation ("The zoo." == "the zoo"), or
mathematical equivalence by `math-verify` ("1/2" == "0.5", "\\boxed{42}" == "42").

Rule rewards have trl's reward-function signature; trl's `GRPOTrainer` calls every reward as

    f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

where `columns` are the dataset's other columns (here `gt`, a list of reference answers per row)
plus a few trainer extras (`trainer_state`, `log_metric`, ...), hence the `**kwargs`. A completion
is a string (plain prompts) or, for conversational prompts, a list of messages whose last one is
the assistant's answer. Our PPO stage calls the same functions.

    correctness    1.0 if the final answer equals a reference answer (is_correct), else 0.0
    format_reward  1.0 for a well-formed final "The answer is X." line, 0.5 for \\boxed{X} or
                   "#### X" (answer findable but not in the course's format), 0.0 for none
    load_reward("pkg.module:function")   any other callable with the same signature
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from math_verify import parse, verify

from dataset.demo import extract_answer as extract_answer_line

BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
GSM8K = re.compile(r"####\s*([^\n]+)")
# We disable math-verify's signal-based timeouts on purpose (see answers_match); silence its reminder.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def final_answer(text: str) -> str | None:
    """The answer a completion commits to, or None if it never states one in a known format."""
    line = extract_answer_line(text)
    if line is not None:
        return line
    boxed = BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    gsm = GSM8K.findall(text)
    return gsm[-1].strip() if gsm else None


def normalise(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip().lower()
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)  # 1,000 -> 1000
    return re.sub(r"\s+", " ", answer)


def answers_match(predicted: str | None, gold: str) -> bool:
    if predicted is None or not predicted.strip():
        return False
    if normalise(predicted) == normalise(gold):
        return True
    # math-verify needs math delimiters: bare LaTeX parses to nothing. Timeouts use signals, which
    # only work in the main thread, so they are disabled (every check here takes < 1 ms).
    g = parse(f"${normalise(gold)}$", parsing_timeout=None)
    p = parse(f"${normalise(predicted)}$", parsing_timeout=None)
    if not g or not p:
        return False
    try:
        return bool(verify(g, p, timeout_seconds=None))
    except Exception:  # math-verify raises on exotic expressions; those are simply not equal
        return False


def is_correct(completion: str, golds: Sequence[str]) -> bool:
    """Does the completion's final answer match any of the reference answers?"""
    predicted = final_answer(completion)
    return any(answers_match(predicted, g) for g in golds)


def grade(replies: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, Any]:
    """accuracy = #correct / n by `is_correct`; answered = share of replies that state a final answer
    at all; correct = the per-reply verdicts. n = 0 gives accuracy nan."""
    correct = [is_correct(r, g) for r, g in zip(replies, golds)]
    n = len(correct)
    return {"accuracy": sum(correct) / n if n else float("nan"),
            "answered": sum(final_answer(r) is not None for r in replies) / n if n else float("nan"),
            "n": n, "correct": correct}

RewardFunc = Callable[..., list[float]]

# "The answer is X." ending the text: X is everything after "is" up to an optional final period.
ANSWER_LINE = re.compile(r"the answer is\s+(\S.*?)\.?\s*$", re.IGNORECASE)


def completion_text(completion: str | Sequence[dict] | dict) -> str:
    """The text the model wrote: a string as is, or the content of the last message of a
    conversational completion (`[{"role": "assistant", "content": ...}]`)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if not completion:
        return ""
    return str(completion[-1].get("content") or "")


def _golds(gt: Any) -> list[str]:
    """One row's reference answers as a list of strings (a bare string or number is one answer)."""
    if gt is None:
        return []
    if isinstance(gt, (str, int, float)):
        return [str(gt)]
    return [str(g) for g in gt]


def correctness(prompts: Sequence, completions: Sequence, gt: Sequence | None = None, **kwargs: Any) -> list[float]:
    """r = 1 if final_answer(completion) is equivalent to one of the row's `gt` answers, else 0.

    Rows without a `gt` column (or with an empty one) cannot be graded and score 0."""
    if gt is None:
        gt = [None] * len(completions)
    return [1.0 if is_correct(completion_text(c), _golds(g)) else 0.0 for c, g in zip(completions, gt)]


def needs_gt(reward_funcs: Sequence) -> bool:
    """Whether a reward grades against the rows' `gt` (then a prompt without one is a bad line)."""
    return any(f is correctness for f in reward_funcs)


def format_score(text: str) -> float:
    """1.0: the last non-empty line is "The answer is X." (the course's format);
    0.5: an answer can still be read (\\boxed{X} or "#### X") but not in that format;
    0.0: no final answer at all."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    match = ANSWER_LINE.search(lines[-1]) if lines else None
    # Nothing may follow the answer: "The answer is 5. Or 6" is not well formed.
    if match and final_answer(lines[-1]) == match[1].strip():
        return 1.0
    if BOXED.search(text) or GSM8K.search(text):
        return 0.5
    return 0.0


def format_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """Partial credit for stating a final answer in a checkable form; see `format_score`."""
    return [format_score(completion_text(c)) for c in completions]


BUILTIN_REWARDS: dict[str, RewardFunc] = {"correctness": correctness, "format": format_reward}


def load_reward(spec: str) -> RewardFunc:
    """A reward function by name: `correctness`, `format`, or `"package.module:function"`.

    Raises ValueError with a readable message when the spec is malformed, the module cannot be
    imported, the attribute is missing or it is not callable."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected one of {', '.join(BUILTIN_REWARDS)} "
                         f"or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e})") from e
    func = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(func).__name__}, not a callable "
                         f"f(prompts, completions, **columns) -> list[float]")
    return func


def parse_reward_specs(values: str | Sequence[str] | None) -> list[str]:
    """`--reward` values (repeatable, each may be a comma list) -> a flat list of specs."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


def build_rewards(spec: str | Sequence[str], weights: str | None = None) -> tuple[list[RewardFunc], list[float] | None]:
    """`--reward` and `--reward_weights` -> (reward functions, weights or None = all 1).
    Raises ValueError with a readable message."""
    specs = parse_reward_specs(spec)
    if not specs:
        raise ValueError("--reward: give at least one reward (correctness, format or package.module:function)")
    funcs = [load_reward(s) for s in specs]
    if not weights:
        return funcs, None
    try:
        values = [float(w) for w in str(weights).split(",") if w.strip()]
    except ValueError as e:
        raise ValueError(f"--reward_weights {weights!r}: not a comma list of numbers") from e
    if len(values) != len(funcs):
        raise ValueError(f"--reward_weights has {len(values)} values for {len(funcs)} rewards ({', '.join(specs)})")
    return funcs, values
