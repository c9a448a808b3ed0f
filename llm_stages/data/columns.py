"""What every record kind reads through first: `data.columns` (a file's fields -> the role names the
readers understand, as LLaMA-Factory's `columns`), the reader chosen by `data.format` or detected
from a record's keys, and the 'cannot tell' error that suggests the `data.columns` override that
would read a record. The kinds themselves live in `llm_stages/data/kinds/`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from llm_stages.data.messages import parse_tools, text_value
from llm_stages.data.sources import Record
from llm_stages.errors import ConfigError, DataFormatError

# The field names `data.columns` maps onto (the keys every reader understands).
ROLE_NAMES = {"text", "messages", "conversations", "system", "tools", "instruction", "input", "output", "history",
              "source", "target", "prompt", "question", "answer", "chosen", "rejected", "context", "margin",
              "completion", "label", "response_chosen", "response_rejected", "choices"}


def prepare(record: Record, columns: Mapping | None = None) -> Record:
    """A record as the readers take it: an object, with `columns` renamed (role -> the file's field)."""
    data = record.data
    if isinstance(data, list):  # a bare conversation
        data = {"messages": data}
    if not isinstance(data, dict):
        raise DataFormatError(record.path, f"expected a JSON object (a record), got {type(data).__name__}",
                              line=record.line)
    if columns:
        renamed = dict(data)
        for role, source in columns.items():
            if source not in data:
                raise DataFormatError(record.path, f"data.columns.{role}={source}: no such field (record keys: "
                                      f"{sorted(data)})", line=record.line)
            renamed.pop(source, None)
        for role, source in columns.items():
            renamed[role] = data[source]
        data = renamed
    return Record(record.path, record.line, data)


def check_columns(columns: Mapping | None) -> None:
    """Refuse a `data.columns` key that no reader understands, before any data is read."""
    unknown = sorted(set(columns or {}) - ROLE_NAMES)
    if unknown:
        raise ConfigError(f"data.columns: unknown role(s) {unknown}; the roles are {sorted(ROLE_NAMES)}")


def read_as(record: Record, fmt: str, readers: dict, detect: Callable[[Record], str], kind: str):
    """reader(record), the reader named by `fmt` (data.format) or detected from the record's keys."""
    name = detect(record) if fmt in (None, "auto") else fmt
    if name not in readers:
        raise DataFormatError(record.path, f"unknown {kind} format {name!r} (data.format); known: {sorted(readers)}")
    return readers[name](record)


def field(record: Record, name: str):
    """A field the record must have (not null)."""
    if name not in record.data or record.data[name] is None:
        raise DataFormatError(record.path, f"missing (record keys: {sorted(record.data)})", line=record.line, field=name)
    return record.data[name]


def with_system(record: Record, messages: list[dict]) -> list[dict]:
    """The record's `system` field, when set, as the first turn (unless the turns have one)."""
    system = record.data.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": text_value(record, "system", system)}] + messages
    return messages


def record_tools(record: Record) -> list[dict] | None:
    """The tool schemas of the record's `tools` field, if any."""
    return parse_tools(record, record.data.get("tools"))


def unpaired_elsewhere(record: Record) -> DataFormatError:
    """Unpaired feedback given where a conversation or a pair is read."""
    return DataFormatError(record.path, "unpaired feedback ({prompt, completion, label} or messages + label) is read by "
                           "the KTO stage (stage=kto); rm and dpo need a chosen and a rejected reply per "
                           "prompt, sft trains on conversations without a label", line=record.line)


# For the override an error suggests: which of a file's fields most likely plays each role.
_SYNONYMS = {
    "prompt": ("problem", "query", "instruction", "question", "input", "prompt_text", "context", "user"),
    "completion": ("response", "solution", "output", "answer", "target", "reply", "assistant"),
    "answer": ("answer", "gt_answer", "ground_truth", "final_answer", "solution", "target", "output"),
    "messages": ("dialog", "dialogue", "conversation", "chat", "turns", "history"),
    "chosen": ("chosen_messages", "preferred", "chosen_response", "better", "good", "positive", "accepted", "win"),
    "rejected": ("rejected_messages", "dispreferred", "rejected_response", "worse", "bad", "negative", "lose"),
    "text": ("content", "document", "body", "raw_text", "passage"),
    "label": ("kto_tag", "desirable", "is_good", "thumbs_up", "rating"),
}
_KIND_ROLES = {"conversation": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
               "prompt": ("prompt", "answer"), "text": ("text",), "unpaired feedback": ("prompt", "completion", "label")}
_REQUIRED = {"prompt", "text", "chosen", "rejected", "completion", "label"}


def cannot_tell(record: Record, kind: str, expected: str) -> DataFormatError:
    """'Cannot tell', with the record's keys and the `data.columns` override that would read it."""
    data, keys = record.data, sorted(record.data)
    roles = _KIND_ROLES.get(kind, ())
    lists = [k for k in keys if isinstance(data[k], list)]
    if kind == "conversation" and lists:
        roles = ("messages",)
    if kind == "preference" and any(k in lists for k in ("chosen_messages", "chosen_conversation")) or (
            kind == "preference" and len(lists) >= 2 and not any(k in data for k in _SYNONYMS["prompt"])):
        roles = ("chosen", "rejected")  # two whole conversations: the prompt is what they share
    suggestion: dict[str, str] = {}
    for role in roles:
        used = set(suggestion.values())
        candidates = [k for k in _SYNONYMS.get(role, ()) if k in data and k not in used]
        candidates += [k for k in keys if role in k.lower() and k not in used]
        if role == "messages":
            candidates = [k for k in candidates if k in lists] or lists
        if not candidates and role in _REQUIRED and not suggestion:  # the first text field, for the first role
            candidates = [k for k in keys if isinstance(data[k], str) and k not in used]
        if candidates:
            suggestion[role] = candidates[0]
    hint = (" — e.g. data.columns='{" + ", ".join(f"{r}: {k}" for r, k in suggestion.items()) + "}'"
            if any(r in _REQUIRED or r == "messages" for r in suggestion) else "")
    alternative = "" if kind in ("prompt", "text") else ", or set data.format"
    return DataFormatError(record.path, f"cannot tell the {kind} format from keys {keys}; expected {expected}; "
                           f"map your fields with data.columns{hint}{alternative}", line=record.line)
