"""Rule (verifiable) reward functions for PPO and GRPO, chosen by `_target_` in the stage config.

Every reward function is called as

    fn(completions, prompts=..., answers=..., fields=...) -> list[float]

with the decoded replies, the last user message of each prompt, each prompt's reference answer
(None when the data has none) and its whole data record. Functions take what they need and
ignore the rest (`**_`). Configure extra arguments with `_partial_: true`, e.g.

    format: {weight: 0.2, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, pattern: '...'}}

Math answers are read and compared by `llm_stages.data.answers`.
"""

from __future__ import annotations

import re

from llm_stages.data.answers import final_answer, numeric_answer, same_answer


def answer_match(completions: list[str], answers: list[str | None], **_) -> list[float]:
    """1.0 where the reply's final answer equals the reference's (see `same_answer`); the
    reference may be a whole worked solution (gsm8k `#### N`, MATH `\\boxed{...}`)."""
    return [float(same_answer(final_answer(c), final_answer(a))) for c, a in zip(completions, answers)]


def answer_closeness(completions: list[str], answers: list[str | None], scale: float = 10.0, **_) -> list[float]:
    """Partial credit for numeric answers: 1 - |predicted - reference| / scale, floored at 0
    (0 for no number or a non-numeric reference). Denser than `answer_match` while a model is
    still approximately right, e.g. off by a few units."""
    scores = []
    for completion, answer in zip(completions, answers):
        predicted, reference = numeric_answer(completion), numeric_answer(answer)
        if predicted is None or reference is None:
            scores.append(0.0)
            continue
        scores.append(max(0.0, 1.0 - abs(predicted - reference) / scale))
    return scores


def format_match(completions: list[str], pattern: str, **_) -> list[float]:
    """1.0 where the whole reply (stripped) matches the regular expression `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


_EQUATION = re.compile(r"\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*")
_OPERATOR_WORDS = {"+": "+", "plus": "+", "-": "-", "minus": "-"}


def demo_equation(completions: list[str], prompts: list[str], **_) -> list[float]:
    """The demo task's partial credit: the share of (first operand, operator, second operand) of
    the question that the reply's equation `a op b = c` restates correctly (0 for any other shape).
    It rewards reading the question right, which a tiny model can learn in minutes; pair it with
    `answer_match` for the result itself."""
    scores = []
    for completion, prompt in zip(completions, prompts):
        numbers = re.findall(r"\d+", prompt)
        operator = re.search(r"\s(\+|-|plus|minus)\s", prompt)
        equation = _EQUATION.fullmatch(completion)
        if len(numbers) < 2 or operator is None or equation is None:
            scores.append(0.0)
            continue
        wanted = (numbers[0], _OPERATOR_WORDS[operator.group(1)], numbers[1])
        scores.append(sum(w == g for w, g in zip(wanted, equation.groups()[:3])) / 3)
    return scores
