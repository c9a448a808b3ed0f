"""Multiple-choice questions (MMLU / C-Eval style, evaluation only): `{"question", "choices", "answer"}`,
the answer an index into `choices` or a letter (A = the first); any field names through `data.columns`
(e.g. `{question: input, choices: options, answer: target}`). Rendered as one sequence per option:
the question as a user turn up to the assistant's turn (the chat template's own rendering), then the
option, only the option labelled, so its log-likelihood is the sum over its tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from llm_stages.data.columns import field, prepare
from llm_stages.data.kinds.prompt import render_prompt
from llm_stages.data.messages import text_value
from llm_stages.data.render import IGNORE_INDEX, Example
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Choice(NamedTuple):
    question: str
    choices: list[str]
    answer: int  # index of the correct choice


def read_choice(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Choice:
    record = prepare(record, columns)
    question = text_value(record, "question", field(record, "question"))
    choices = field(record, "choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataFormatError(record.path, f"expected a list of at least two options, got {choices!r}",
                              line=record.line, field="choices")
    choices = [text_value(record, f"choices[{i}]", c) for i, c in enumerate(choices)]
    answer = field(record, "answer")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)] and answer.strip():
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    elif isinstance(answer, str) and answer.strip().isdigit() and int(answer) < len(choices):
        index = int(answer)
    else:
        raise DataFormatError(record.path, f"expected an index 0..{len(choices) - 1} or a letter "
                              f"A..{LETTERS[len(choices) - 1]}, got {answer!r}", line=record.line, field="answer")
    return Choice(question, choices, index)


def option_text(choice: Choice, index: int, show_choices: bool) -> str:
    """What is scored: the option's text, or its letter when the question lists the options."""
    return LETTERS[index] if show_choices else choice.choices[index]


def render_choice(tokenizer, choice: Choice, *, show_choices: bool = False) -> list[Example]:
    """One sequence per option, only the option's tokens labelled. `show_choices`: the user turn lists
    the options as "A. ..." lines and the letter is scored (MMLU's prompt); else the option's text
    is scored as the reply (cloze style, as lm-eval's ARC/HellaSwag)."""
    question = choice.question
    if show_choices:
        question += "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choice.choices)) + "\nAnswer:"
    context = render_prompt(tokenizer, [{"role": "user", "content": question}], None).input_ids
    examples = []
    for i in range(len(choice.choices)):
        option = tokenizer(option_text(choice, i, show_choices), add_special_tokens=False)["input_ids"]
        examples.append(Example(context + option, [IGNORE_INDEX] * len(context) + option))
    return examples
