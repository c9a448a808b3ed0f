"""Record readers: files on disk -> plain Python records, with the place each came from.

One small function per format. Conversations come out as OpenAI-style messages
(`[{"role": "system"|"user"|"assistant", "content": str}]`) so everything downstream renders them
through the tokenizer's chat template; plain text comes out as documents (str).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from llm_stages.errors import DataFormatError


class Record(NamedTuple):
    path: str
    line: int  # 1-based line (jsonl/txt) or record number (json array)
    data: Any


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if not path.is_file():
        raise DataFormatError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "file is empty")


def read_json_records(path: str | Path) -> list[Record]:
    """Records of a .jsonl file (one JSON object per line) or a .json file (an array of objects)."""
    path = Path(path)
    _check_file(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
        if not isinstance(array, list):
            raise DataFormatError(path, "a .json data file must hold an array of records")
        records = [Record(str(path), i + 1, r) for i, r in enumerate(array)]
    else:
        records = []
        for i, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                records.append(Record(str(path), i, json.loads(raw)))
            except json.JSONDecodeError as e:
                raise DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=i) from None
    if not records:
        raise DataFormatError(path, "no records in file")
    for r in records:
        if not isinstance(r.data, dict):
            raise DataFormatError(r.path, f"expected a JSON object, got {type(r.data).__name__}", line=r.line)
    return records


def read_text_documents(path: str | Path) -> list[Record]:
    """Documents of a .txt file, separated by one or more blank lines (a file without blank lines
    is one document per line, like the seeds' pretraining text)."""
    path = Path(path)
    _check_file(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    has_blank_separators = any(not line.strip() for line in lines)
    docs: list[Record] = []
    current: list[str] = []
    start = 1
    for i, line in enumerate(lines, start=1):
        if not has_blank_separators:
            if line.strip():
                docs.append(Record(str(path), i, line))
            continue
        if line.strip():
            if not current:
                start = i
            current.append(line)
        elif current:
            docs.append(Record(str(path), start, "\n".join(current)))
            current = []
    if current:
        docs.append(Record(str(path), start, "\n".join(current)))
    if not docs:
        raise DataFormatError(path, "no text in file")
    return docs


# --- text documents -----------------------------------------------------------------------------

def text_of(record: Record) -> str:
    """The document text of a `.txt` document or a `{"text": ...}` record."""
    if isinstance(record.data, str):
        return record.data
    return _field(record, "text", str)


# --- conversations -------------------------------------------------------------------------------

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "system": "system",
}


def sharegpt_messages(record: Record) -> list[dict]:
    """`{"conversations": [{"from": "human"|"gpt"|"system", "value": str}], "system"?: str}`."""
    turns = _field(record, "conversations", list)
    messages = []
    system = record.data.get("system")
    if system:
        messages.append({"role": "system", "content": _as_str(record, "system", system)})
    for k, turn in enumerate(turns):
        name = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise DataFormatError(record.path, "expected an object", line=record.line, field=name)
        speaker = turn.get("from", turn.get("role"))
        if speaker not in _SHAREGPT_ROLES:
            raise DataFormatError(record.path, f"unknown speaker {speaker!r} (expected one of "
                                  f"{sorted(_SHAREGPT_ROLES)})", line=record.line, field=f"{name}.from")
        content = turn.get("value", turn.get("content"))
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": _as_str(record, f"{name}.value", content)})
    return messages


def alpaca_messages(record: Record) -> list[dict]:
    """`{"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[q, a], ...]}`."""
    instruction = _field(record, "instruction", str)
    output = _field(record, "output", str)
    extra = record.data.get("input") or ""
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages = []
    if record.data.get("system"):
        messages.append({"role": "system", "content": _as_str(record, "system", record.data["system"])})
    for k, pair in enumerate(record.data.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataFormatError(record.path, "expected a [question, answer] pair", line=record.line,
                                  field=f"history[{k}]")
        messages += [{"role": "user", "content": _as_str(record, f"history[{k}][0]", pair[0])},
                     {"role": "assistant", "content": _as_str(record, f"history[{k}][1]", pair[1])}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def messages_messages(record: Record) -> list[dict]:
    """OpenAI `{"messages": [{"role", "content"}]}`."""
    out = []
    for k, m in enumerate(_field(record, "messages", list)):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataFormatError(record.path, "expected {role: system|user|assistant, content}",
                                  line=record.line, field=f"messages[{k}].role")
        out.append({"role": m["role"], "content": _as_str(record, f"messages[{k}].content", m.get("content"))})
    return out


CONVERSATION_READERS: dict[str, Callable[[Record], list[dict]]] = {
    "sharegpt": sharegpt_messages,
    "alpaca": alpaca_messages,
    "messages": messages_messages,
}


def detect_conversation_format(record: Record) -> str:
    """The conversation format of a record, from its keys."""
    keys = record.data.keys()
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    raise DataFormatError(record.path, f"cannot tell the conversation format from keys {sorted(keys)}; "
                          "expected 'conversations' (sharegpt), 'messages', or 'instruction'+'output' "
                          "(alpaca), or set data.format", line=record.line)


def iter_conversations(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, list[dict]]]:
    return _read_all(records, fmt, CONVERSATION_READERS, detect_conversation_format, "conversation")


def _read_all(records: list[Record], fmt: str, readers: dict, detect: Callable[[Record], str], kind: str) -> Iterator:
    """(record, reader(record)) for each record, the reader named by `fmt` or detected per record."""
    for record in records:
        name = detect(record) if fmt == "auto" else fmt
        if name not in readers:
            raise DataFormatError(record.path, f"unknown {kind} format {name!r}; known: {sorted(readers)}")
        yield record, readers[name](record)


# --- helpers -------------------------------------------------------------------------------------

def _field(record: Record, name: str, kind: type):
    if name not in record.data:
        raise DataFormatError(record.path, f"missing (record keys: {sorted(record.data)})",
                              line=record.line, field=name)
    value = record.data[name]
    if not isinstance(value, kind):
        raise DataFormatError(record.path, f"expected {kind.__name__}, got {type(value).__name__}",
                              line=record.line, field=name)
    return value


def _as_str(record: Record, field: str, value) -> str:
    if not isinstance(value, str):
        raise DataFormatError(record.path, f"expected a string, got {type(value).__name__}",
                              line=record.line, field=field)
    return value


# --- preference pairs ----------------------------------------------------------------------------

class Pair(NamedTuple):
    prompt: list[dict]  # messages before the compared reply
    chosen: str
    rejected: str


def _reply(record: Record, name: str) -> str:
    """A reply given as a string, a {from/role, value/content} object, or a message list ending in it."""
    value = record.data.get(name)
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if value is None:
        raise DataFormatError(record.path, f"missing (record keys: {sorted(record.data)})", line=record.line, field=name)
    return _as_str(record, name, value)


def sharegpt_pair(record: Record) -> Pair:
    """MedicalGPT / LLaMA-Factory: `{"conversations": [...prompt...], "chosen": ..., "rejected": ...}`."""
    return Pair(sharegpt_messages(record), _reply(record, "chosen"), _reply(record, "rejected"))


def prompt_pair(record: Record) -> Pair:
    """TRL: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`."""
    prompt = record.data["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = messages_messages(Record(record.path, record.line, {"messages": prompt}))
    return Pair(messages, _reply(record, "chosen"), _reply(record, "rejected"))


def medicalgpt_original_pair(record: Record) -> Pair:
    """MedicalGPT original: `{"system"?, "history"?: [[q, a]], "question", "response_chosen", "response_rejected"}`."""
    as_alpaca = Record(record.path, record.line, {"instruction": _field(record, "question", str), "output": "",
                                                  "system": record.data.get("system"), "history": record.data.get("history")})
    messages = alpaca_messages(as_alpaca)[:-1]  # drop the empty placeholder reply
    return Pair(messages, _reply(record, "response_chosen"), _reply(record, "response_rejected"))


PAIR_READERS: dict[str, Callable[[Record], Pair]] = {
    "sharegpt_pair": sharegpt_pair,
    "prompt_pair": prompt_pair,
    "medicalgpt_original": medicalgpt_original_pair,
}


def detect_pair_format(record: Record) -> str:
    keys = record.data.keys()
    if "response_chosen" in keys:
        return "medicalgpt_original"
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_pair"
        if "prompt" in keys:
            return "prompt_pair"
    raise DataFormatError(record.path, f"cannot tell the preference format from keys {sorted(keys)}; expected "
                          "'conversations'+'chosen'+'rejected', 'prompt'+'chosen'+'rejected', or "
                          "'question'+'response_chosen'+'response_rejected', or set data.format", line=record.line)


def iter_pairs(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Pair]]:
    return _read_all(records, fmt, PAIR_READERS, detect_pair_format, "preference")
