"""Reading a model's final answer and checking it against a reference, the one place this is done.

SFT accuracy, the GRPO correctness reward and the RL evaluations all call `is_correct`, so a model
is never graded by two different rules. Answers are found in this order: the course's
"The answer is X." line, the last `\\boxed{X}`, GSM8K's "#### X". Equality is exact text after light
normalisation ("The zoo." == "the zoo"), or mathematical equivalence by `math-verify`
("1/2" == "0.5", "\\boxed{42}" == "42").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

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
