"""Rule (verifiable) reward functions for PPO and GRPO, chosen by `_target_` in the stage config.

Every reward function is called as

    fn(completions, prompts=..., answers=..., fields=...) -> list[float]

with the decoded replies, the last user message of each prompt, each prompt's reference answer
(None when the data has none) and its whole data record. Functions take what they need and
ignore the rest (`**_`). Configure extra arguments with `_partial_: true`, e.g.

    format: {weight: 0.2, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, pattern: '...'}}

Math answers are read and compared by `llm_stages.data.answers`.

Each function declares what it reads besides the replies with `@reads(...)`: "answers" (each
prompt's reference answer), "prompts", or "fields.<name>" (a field of the data record). Before the
first rollout, `check_reward_inputs` reads the first records of the data: a reward whose input is
missing there is an error, since it would score 0 for every reply. Your own functions can declare
too (`from llm_stages.rollout.rewards import reads`); undeclared ones are not checked.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from llm_stages.data import sources
from llm_stages.data.answers import final_answer, numeric_answer, same_answer
from llm_stages.data.kinds.prompt import ANSWER_KEYS, prompt_record
from llm_stages.errors import ConfigError, DataFormatError

# How many records of each data file `check_reward_inputs` reads.
CHECKED_RECORDS = 32


def reads(*inputs: str) -> Callable[[Callable], Callable]:
    """Declares what a reward function reads besides the replies: "answers", "prompts" or
    "fields.<record field>"; `check_reward_inputs` refuses data that lacks it."""
    for name in inputs:
        if name not in ("answers", "prompts") and not name.startswith("fields."):
            raise ValueError(f"a reward reads answers, prompts or fields.<name>, not {name!r}")

    def decorator(fn: Callable) -> Callable:
        fn.reads = tuple(inputs)
        return fn

    return decorator


def reward_inputs(fn: Callable) -> tuple[str, ...]:
    """What `fn` (or the function a `_partial_: true` config made of it) declares it reads; () if undeclared."""
    return tuple(getattr(reward_unwrapped(fn), "reads", ()))


@reads("answers")
def answer_match(completions: list[str], answers: list[str | None], **_) -> list[float]:
    """1.0 where the reply's final answer equals the reference's (see `same_answer`); the
    reference may be a whole worked solution (gsm8k `#### N`, MATH `\\boxed{...}`)."""
    return [float(same_answer(final_answer(c), final_answer(a))) for c, a in zip(completions, answers)]


@reads("answers")
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


@reads()
def format_match(completions: list[str], pattern: str, **_) -> list[float]:
    """1.0 where the whole reply (stripped) matches the regular expression `pattern`."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


_EQUATION = re.compile(r"\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*")
_OPERATOR_WORDS = {"+": "+", "plus": "+", "-": "-", "minus": "-"}


@reads("prompts")
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


def check_reward_inputs(rewards: Mapping[str, Callable], data, paths: Iterable[str | Path] = ()) -> None:
    """The first CHECKED_RECORDS prompts of each data file (`data.path` or `data.sources`, and `paths`,
    e.g. the validation file) hold what each rule reward (`rollout.rewards`: {name: function}) declares
    it reads, or one ConfigError naming the reward, the file and record, and the `data.columns` fix.
    Records that cannot be read at all are the DataModule's to report (or skip)."""
    needs = {name: [i for i in reward_inputs(fn) if i != "prompts"] for name, fn in rewards.items()}
    if not any(needs.values()):
        return
    columns = dict(data.get("columns") or {}) or None
    files = [src["path"] for src in data.get("sources") or []] or [data["path"]]
    for path in dict.fromkeys(str(p) for p in [*files, *paths] if p is not None):
        for record in itertools.islice(sources.read_configured(path, data, on_bad_line=lambda e: None), CHECKED_RECORDS):
            try:
                prompt = prompt_record(record, columns)
            except DataFormatError:
                continue
            for name, inputs in needs.items():
                for needed in inputs:
                    _check_input(name, rewards[name], needed, record, prompt.answer, prompt.fields)


def _check_input(name: str, fn: Callable, needed: str, record, answer, fields: dict) -> None:
    function = getattr(reward_unwrapped(fn), "__name__", repr(fn))
    where = f"{record.path} record {record.line}"
    if needed == "answers" and answer is None:
        raise ConfigError(f"reward {name} ({function}) reads each prompt's reference answer, but {where} has none (no "
                          f"field {'/'.join(ANSWER_KEYS)}, nor a final assistant turn; record keys: {sorted(fields)}); "
                          "map yours with data.columns.answer=<your field>")
    field = needed.removeprefix("fields.")
    if needed.startswith("fields.") and fields.get(field) is None:
        raise ConfigError(f"reward {name} ({function}) reads the record field {field!r}, but {where} has none "
                          f"(record keys: {sorted(fields)}); add it to the data, or use another reward")


def reward_unwrapped(fn: Callable) -> Callable:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn
