"""RL prompts (PPO, GRPO): a conversation to continue and, when the data has one, a reference answer
for rule rewards. Read from `{"prompt"}`, `{"question" | "problem" | ...}` or conversations whose
final assistant turn is the reference answer; rendered up to the assistant's turn; collated
left-padded, so generation continues every row at the same position."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from llm_stages.data.answers import final_answer
from llm_stages.data.columns import cannot_tell, prepare, record_tools, with_system
from llm_stages.data.describe import Description, decode, length_stats
from llm_stages.data.kinds.conversation import messages_messages, sharegpt_messages
from llm_stages.data.messages import text_value, to_messages
from llm_stages.data.render import Rendered, with_system_prompt
from llm_stages.data.sources import Record
from llm_stages.data.template import render_text, template_messages
from llm_stages.errors import DataFormatError


class Prompt(NamedTuple):
    messages: list[dict]  # the conversation to continue
    answer: str | None  # reference answer for rule rewards, when the data has one
    fields: dict  # the whole record, for reward functions that need more
    tools: list[dict] | None = None


PROMPT_KEYS = ("prompt", "question", "problem", "query", "instruction")
ANSWER_KEYS = ("answer", "reference", "gt_answer", "ground_truth", "final_answer", "solution", "output", "target")

_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


# --- read ----------------------------------------------------------------------------------------

def reference_answer(answer) -> str | None:
    """The final answer of a reference (`answers.final_answer`: gsm8k's `#### 42`, a MATH
    solution's last `\\boxed{...}`, else the text), thousands separators dropped from a plain number."""
    final = final_answer(answer)
    return final.replace(",", "") if final and _THOUSANDS.fullmatch(final) else final


def prompt_record(record: Record, columns: Mapping | None = None) -> Prompt:
    """`{"prompt": str | messages}`, `{"question" | "problem" | "query" | "instruction", ...}`, or
    `{"messages" | "conversations"}` (a final assistant turn, if any, is the reference answer); the
    answer from the first of `ANSWER_KEYS` present (a worked solution gives its final answer)."""
    record = prepare(record, columns)
    data = record.data
    answer = next((data[k] for k in ANSWER_KEYS if data.get(k) is not None), None)
    key = next((k for k in PROMPT_KEYS if k in data), None)
    if key is not None:
        prompt = data[key]
        if isinstance(prompt, (list, dict)):
            messages = to_messages(record, key, prompt)
        else:
            text = text_value(record, key, prompt)
            extra = data.get("input") if key == "instruction" else None
            messages = [{"role": "user", "content": f"{text}\n{extra}" if extra else text}]
        messages = with_system(record, messages)
    elif "messages" in data or "conversations" in data:
        messages = messages_messages(record) if "messages" in data else sharegpt_messages(record)
        if messages and messages[-1]["role"] == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
    else:
        raise cannot_tell(record, "prompt", f"one of {list(PROMPT_KEYS)}, 'messages' or 'conversations'")
    if not messages or messages[-1]["role"] != "user":
        raise DataFormatError(record.path, "the prompt must end with a user turn", line=record.line)
    return Prompt(messages, reference_answer(answer), dict(data), record_tools(record))


def read_prompt(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Prompt:
    """`prompt_record` as the DataModule calls every kind's reader (prompts have no `data.format`)."""
    return prompt_record(record, columns)


def detect_format(record: Record) -> str:
    """Which prompt layout a record has (as `prompt_record` reads it): the prompt key, 'messages' or 'sharegpt'."""
    prompt_record(record)  # raises the clear error for a record without a prompt
    keys = record.data
    return next((k for k in PROMPT_KEYS if k in keys), "messages" if "messages" in keys else "sharegpt")


# --- render --------------------------------------------------------------------------------------

class PromptExample(NamedTuple):
    """An RL prompt: rendered up to the assistant's turn, ready for generation."""

    input_ids: list[int]
    prompt: str  # the last user message, for rule rewards
    answer: str | None  # reference answer, when the data has one
    messages: list[dict] | None = None  # the conversation rendered (system prompt included): episodes render it with their tools
    fields: dict | None = None  # the whole data record: an environment's reset(**fields), rewards' `fields`


def example_from_json(item) -> PromptExample:
    return PromptExample(*item)


def render_prompt(tokenizer, messages: list[dict], answer: str | None, tools: list[dict] | None = None) -> PromptExample:
    text = render_text(tokenizer, *template_messages(tokenizer, messages, tools), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return PromptExample(ids, messages[-1]["content"], answer, messages)


def render(tokenizer, prompt: Prompt, *, system_prompt: str | None, max_prompt_length: int) -> Rendered:
    """The prompt up to the assistant's turn; dropped when longer than `max_prompt_length` tokens."""
    example = render_prompt(tokenizer, with_system_prompt(prompt.messages, system_prompt), prompt.answer, prompt.tools)
    if len(example.input_ids) > max_prompt_length:
        return Rendered(None, dropped="prompt_too_long")
    return Rendered(example._replace(fields=prompt.fields))


# --- collate -------------------------------------------------------------------------------------

class PromptBatch(NamedTuple):
    """RL prompts, left-padded so generation continues every row at the same position."""

    input_ids: torch.Tensor  # (prompts, longest prompt)
    attention_mask: torch.Tensor
    prompts: list[str]  # last user message of each
    answers: list[str | None]
    messages: list[list[dict] | None] | None = None  # each prompt's conversation (PromptExample.messages)
    fields: list[dict | None] | None = None  # each prompt's data record


def collate_prompts(examples: list[PromptExample], pad_id: int) -> PromptBatch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, width - len(e.input_ids):] = torch.tensor(e.input_ids)
        attention_mask[row, width - len(e.input_ids):] = 1
    return PromptBatch(input_ids, attention_mask, [e.prompt for e in examples], [e.answer for e in examples],
                       [e.messages for e in examples], [e.fields for e in examples])


# --- describe ------------------------------------------------------------------------------------

def describe(prompts: list[PromptExample], tokenizer) -> Description:
    first = prompts[0]
    with_answer = sum(e.answer is not None for e in prompts)
    return Description({"prompt": length_stats([len(e.input_ids) for e in prompts])},
                       {"prompt": decode(tokenizer, first.input_ids)},
                       f"{len(first.input_ids)} prompt tokens; reference answer {first.answer!r}; "
                       f"{with_answer} of {len(prompts)} prompts have one")
