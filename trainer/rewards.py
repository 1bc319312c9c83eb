"""Rule rewards for RL stages, with trl's reward-function signature.

trl's `GRPOTrainer` calls every reward function as

    f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

where `columns` are the dataset's other columns (here `gt`, a list of reference answers per row)
plus a few trainer extras (`trainer_state`, `log_metric`, ...), hence the `**kwargs`. A completion
is a string (plain prompts) or, for conversational prompts, a list of messages whose last one is
the assistant's answer. Our PPO stage calls the same functions, so one rule grades both.

    correctness    1.0 if the final answer equals a reference answer (trainer.answers.is_correct), else 0.0
    format_reward  1.0 for a well-formed final "The answer is X." line, 0.5 for \\boxed{X} or
                   "#### X" (answer findable but not in the course's format), 0.0 for none
    load_reward("pkg.module:function")   any other callable with the same signature
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from trainer.answers import BOXED, GSM8K, final_answer, is_correct

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
