"""Conversations (SFT): read from sharegpt, OpenAI/ColossalAI messages, alpaca, ColossalAI single
turn or TRL prompt/completion records; rendered through the chat template with the assistant
replies trained (a prompt/completion record's completion only, by default); collated as causal
rows, or packed several to a row (`pack_examples`, `collate_packed`) with attention kept inside
each conversation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch

from llm_stages.data.collate import CausalBatch, collate_causal
from llm_stages.data.columns import cannot_tell, field, prepare, read_as, record_tools, unpaired_elsewhere, with_system
from llm_stages.data.describe import Description, causal_lengths, mark_trained, trained
from llm_stages.data.messages import content_parts, text_value, to_messages
from llm_stages.data.render import (Example, Rendered, num_trained_tokens, render_conversation, truncate,
                                    with_system_prompt)
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError


class Conversation(NamedTuple):
    messages: list[dict]
    tools: list[dict] | None = None  # tool schemas the template shows (in the system turn, for Qwen2.5)


# --- read ----------------------------------------------------------------------------------------

def sharegpt_messages(record: Record) -> list[dict]:
    """`{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
    "system"?, "tools"?}`."""
    return with_system(record, to_messages(record, "conversations", field(record, "conversations")))


def messages_messages(record: Record) -> list[dict]:
    """OpenAI `{"messages": [{"role", "content", "tool_calls"?}]}`, ColossalAI `{"messages": [{"from", "content"}]}`."""
    return with_system(record, to_messages(record, "messages", field(record, "messages")))


def alpaca_messages(record: Record) -> list[dict]:
    """`{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`."""
    instruction = text_value(record, "instruction", field(record, "instruction"))
    output = text_value(record, "output", field(record, "output"))
    extra = text_value(record, "input", record.data.get("input"), allow_none=True)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages = []
    for k, pair in enumerate(record.data.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataFormatError(record.path, "expected a [question, answer] pair", line=record.line,
                                  field=f"history[{k}]")
        messages += [{"role": "user", "content": text_value(record, f"history[{k}][0]", pair[0])},
                     {"role": "assistant", "content": text_value(record, f"history[{k}][1]", pair[1])}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return with_system(record, messages)


def colossal_single_messages(record: Record) -> list[dict]:
    """ColossalAI single turn `{"source", "target"}`: source is the prompt, target the reply."""
    return with_system(record, [{"role": "user", "content": text_value(record, "source", field(record, "source"))},
                                {"role": "assistant", "content": text_value(record, "target", field(record, "target"))}])


def prompt_completion_messages(record: Record) -> list[dict]:
    """TRL `{"prompt": str | messages, "completion": str | messages}` (no label: that is unpaired feedback).
    Assistant turns of the prompt are marked `in_prompt`: context, not trained unless asked (`render`)."""
    prompt = [{**m, "in_prompt": True} if m["role"] == "assistant" else m for m in prompt_messages(record)]
    return prompt + replies(record, "completion")


def prompt_messages(record: Record) -> list[dict]:
    """The `prompt` field, a string (one user turn) or messages."""
    prompt = field(record, "prompt")
    if isinstance(prompt, (list, dict)):
        return with_system(record, to_messages(record, "prompt", prompt))
    return with_system(record, [{"role": "user", "content": text_value(record, "prompt", prompt)}])


def replies(record: Record, name: str) -> list[dict]:
    """A reply given as a string, a message object, or a list of messages (all assistant/tool turns)."""
    value = record.data.get(name)
    if value is None:
        raise DataFormatError(record.path, f"missing (record keys: {sorted(record.data)})", line=record.line, field=name)
    is_parts = isinstance(value, list) and all(isinstance(p, str) or isinstance(p, dict) and "type" in p
                                               and "role" not in p and "from" not in p for p in value)
    if isinstance(value, dict) or isinstance(value, list) and not is_parts:  # a message, or a list of them
        messages = to_messages(record, name, value)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataFormatError(record.path, "expected the reply to end with an assistant turn", line=record.line,
                                  field=name)
        return messages
    content = content_parts(record, name, value)
    message = {"role": "assistant", "content": content.text}
    if content.reasoning:
        message["reasoning_content"] = content.reasoning
    if content.tool_calls:
        message["tool_calls"] = content.tool_calls
    return [message]


def reply(record: Record, name: str) -> dict:
    """One assistant reply (see `replies`)."""
    turns = replies(record, name)
    if len(turns) > 1:
        raise DataFormatError(record.path, "expected one assistant reply, got several turns", line=record.line, field=name)
    return turns[0]


CONVERSATION_READERS: dict[str, Callable[[Record], list[dict]]] = {
    "sharegpt": sharegpt_messages,
    "alpaca": alpaca_messages,
    "messages": messages_messages,
    "colossal_single": colossal_single_messages,
    "prompt_completion": prompt_completion_messages,
}


def detect_format(record: Record) -> str:
    keys = record.data.keys()
    if "label" in keys and ("completion" in keys or "messages" in keys):
        raise unpaired_elsewhere(record)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "source" in keys and "target" in keys:
        return "colossal_single"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise cannot_tell(record, "conversation", "'conversations' (sharegpt), 'messages', 'instruction' + 'output' "
                      "(alpaca), 'prompt' + 'completion' or 'source' + 'target'")


def read_conversation(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Conversation:
    record = prepare(record, columns)
    return Conversation(read_as(record, fmt, CONVERSATION_READERS, detect_format, "conversation"), record_tools(record))


def iter_conversations(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Conversation]]:
    return ((record, read_conversation(record, fmt)) for record in records)


# --- render --------------------------------------------------------------------------------------

def render(tokenizer, conversation: Conversation, *, system_prompt: str | None, max_length: int,
           completion_only_loss: bool = True) -> Rendered:
    """The conversation's tokens with its assistant replies trained, cut to `max_length`; dropped
    when no assistant turn is trained, or none is left within `max_length`. Prompt/completion
    records train their completion only (TRL's `completion_only_loss`), unless
    `completion_only_loss=False`, which also trains the assistant turns inside the prompt."""
    messages = with_system_prompt(conversation.messages, system_prompt)
    if completion_only_loss:
        messages = [{**m, "train": False} if m.get("in_prompt") else m for m in messages]
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        return Rendered(None, dropped="no_assistant_turn")
    example = render_conversation(tokenizer, messages, tools=conversation.tools)
    truncated = len(example.input_ids) > max_length
    if truncated:
        example = truncate(example, max_length)
    if num_trained_tokens(example.labels) == 0:
        return Rendered(None, truncated, dropped="no_trained_tokens")
    return Rendered(example, truncated)


class PackedExample(NamedTuple):
    """Several whole examples in one row; `doc_lengths` lets the collator restart positions and
    confine attention to each example (no leakage across examples)."""

    input_ids: list[int]
    labels: list[int]
    doc_lengths: list[int]


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Greedy packing in the given order: an example joins the current row while it fits."""
    rows: list[PackedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for e in examples:
        if lengths and len(ids) + len(e.input_ids) > max_length:
            rows.append(PackedExample(ids, labels, lengths))
            ids, labels, lengths = [], [], []
        ids, labels, lengths = ids + list(e.input_ids), labels + list(e.labels), lengths + [len(e.input_ids)]
    if lengths:
        rows.append(PackedExample(ids, labels, lengths))
    return rows


# --- collate -------------------------------------------------------------------------------------

def collate_packed(rows: list[PackedExample], pad_id: int) -> CausalBatch:
    """Packed rows -> a block-diagonal causal mask (each example attends only to itself) and
    positions restarting at every example, so the model sees exactly what it would unpacked."""
    plain = collate_causal([Example(r.input_ids, r.labels) for r in rows], pad_id)
    batch, width = plain.input_ids.shape
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.arange(width).repeat(batch, 1) + width  # padding: a segment of its own per position
    for row, r in enumerate(rows):
        start = 0
        for k, n in enumerate(r.doc_lengths):
            position_ids[row, start:start + n] = torch.arange(n)
            segment[row, start:start + n] = k
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return CausalBatch(plain.input_ids, mask[:, None], plain.labels, position_ids, real_tokens=plain.attention_mask)


# --- describe ------------------------------------------------------------------------------------

def describe(examples: list[Example | PackedExample], tokenizer) -> Description:
    first = examples[0]
    note = f"{len(first.input_ids)} tokens, {trained(first.labels)} trained"
    if isinstance(first, PackedExample):
        note += f"; a packed row of {len(first.doc_lengths)} conversations"
    return Description(causal_lengths(examples), {"example": mark_trained(tokenizer, first.input_ids, first.labels)},
                       note)
