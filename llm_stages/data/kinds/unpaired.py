"""Unpaired feedback (KTO): a prompt, one reply and a label saying whether the reply is desirable.
Read from TRL's `{prompt, completion, label}` or `{messages, label}`; the KTO stage that would
render, collate and describe it is not built yet, so this kind is a reader only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from llm_stages.data.columns import cannot_tell, field, prepare, read_as, record_tools
from llm_stages.data.kinds.conversation import messages_messages, prompt_messages, reply
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError


class Unpaired(NamedTuple):
    prompt: list[dict]
    completion: dict  # the assistant reply the label judges
    label: bool  # True: desirable
    tools: list[dict] | None = None


def prompt_completion_label(record: Record) -> Unpaired:
    """TRL KTO: `{"prompt": str | messages, "completion": str | messages, "label": bool}`."""
    return Unpaired(prompt_messages(record), reply(record, "completion"), _label(record))


def messages_label(record: Record) -> Unpaired:
    """`{"messages": [... , final assistant reply], "label": bool}`."""
    messages = messages_messages(record)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataFormatError(record.path, "expected the conversation to end with the judged assistant reply",
                              line=record.line, field="messages")
    return Unpaired(messages[:-1], messages[-1], _label(record))


UNPAIRED_READERS: dict[str, Callable[[Record], Unpaired]] = {
    "prompt_completion_label": prompt_completion_label,
    "messages_label": messages_label,
}


def detect_format(record: Record) -> str:
    keys = record.data.keys()
    if "label" in keys and "completion" in keys:
        return "prompt_completion_label"
    if "label" in keys and "messages" in keys:
        return "messages_label"
    raise cannot_tell(record, "unpaired feedback", "'prompt' + 'completion' + 'label' or 'messages' + 'label'")


def read_unpaired(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Unpaired:
    record = prepare(record, columns)
    return read_as(record, fmt, UNPAIRED_READERS, detect_format, "unpaired feedback")._replace(tools=record_tools(record))


def _label(record: Record) -> bool:
    value = field(record, "label")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataFormatError(record.path, f"expected true/false (or 1/0), got {value!r:.40}", line=record.line, field="label")
