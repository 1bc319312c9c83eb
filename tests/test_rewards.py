"""The rule rewards: one grading rule (trainer.lib.grading), both completion shapes trl hands over,
partial credit for format, and readable errors for custom rewards that cannot be loaded."""

from __future__ import annotations

import pytest

from trainer.lib.grading import completion_text, correctness, format_reward, format_score, load_reward, parse_reward_specs


def conv(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("completion, gt, expected", [
    ("23 + 45 = 68. The answer is 68.", ["68"], 1.0),
    ("The answer is 0.5.", ["1/2"], 1.0),               # math-verify equivalence
    ("So we get \\boxed{1/2}", ["0.5"], 1.0),           # boxed instead of the course's line
    ("It is 68 but the answer is 67.", ["68"], 0.0),   # the *final* answer counts
    ("68", ["68"], 0.0),                                # no stated final answer
    ("The answer is the zoo.", ["the zoo"], 1.0),
    ("#### 1,000", ["1000"], 1.0),
    ("asdf \\boxed{ qq", ["5"], 0.0),                   # garbage
    ("The answer is 5.", [], 0.0),                      # nothing to grade against
    ("The answer is 7.", ["6", "7"], 1.0),              # any of several references
])
def test_correctness_on_tricky_answers(completion, gt, expected):
    assert correctness(prompts=[None], completions=[completion], gt=[gt]) == [expected]
    assert correctness(prompts=[None], completions=[conv(completion)], gt=[gt]) == [expected]


def test_correctness_takes_trl_extras_and_scalar_gt():
    got = correctness(prompts=["q", "q"], completions=["The answer is 3.", conv("The answer is 4.")],
                      gt=["3", 5], completion_ids=[[1], [2]], trainer_state=None)
    assert got == [1.0, 0.0]
    assert correctness(prompts=["q"], completions=["The answer is 3."]) == [0.0]  # no gt column


@pytest.mark.parametrize("text, expected", [
    ("2 + 3 = 5. The answer is 5.", 1.0),
    ("Tom has 5.\nThe answer is 5.\n", 1.0),
    ("The answer is 5. Or maybe 6", 0.0),   # something after the answer: not the course's format
    ("The answer is", 0.0),
    ("we get \\boxed{5}", 0.5),
    ("#### 5", 0.5),
    ("", 0.0),
    ("random words", 0.0),
])
def test_format_score(text, expected):
    assert format_score(text) == expected
    assert format_reward(prompts=[None], completions=[conv(text)]) == [expected]


def test_completion_text_shapes():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "y"}]) == "y"
    assert completion_text([]) == ""
    assert completion_text({"role": "assistant", "content": None}) == ""


def test_load_builtin_and_custom_rewards():
    assert load_reward("correctness") is correctness
    assert load_reward(" format ") is format_reward
    assert load_reward("trainer.lib.grading:format_reward") is format_reward
    assert load_reward("trainer.lib.grading:BUILTIN_REWARDS.get") is not None  # dotted attribute path


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("trainer.lib.grading:nope", "has no attribute 'nope'"),
    ("trainer.lib.grading:BUILTIN_REWARDS", "not a callable"),
    ("justaname", "expected one of correctness, format"),
    ("trainer.lib.grading:", "expected one of"),
])
def test_load_reward_errors_are_readable(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_reward(spec)


def test_parse_reward_specs():
    assert parse_reward_specs("correctness, format") == ["correctness", "format"]
    assert parse_reward_specs(["correctness", "format,a.b:c"]) == ["correctness", "format", "a.b:c"]
    assert parse_reward_specs(None) == []
