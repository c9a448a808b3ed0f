"""Record readers: files on disk -> plain Python records, with the place each came from.

One small function per format. Conversations come out as OpenAI-style messages
(`[{"role": "system"|"user"|"assistant", "content": str}]`) so everything downstream renders them
through the tokenizer's chat template; plain text comes out as documents (str).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from llm_stages.errors import DataFormatError


class Record(NamedTuple):
    path: str
    line: int  # 1-based line (jsonl/txt) or record number (json array)
    data: Any


def check_file(path: Path) -> None:
    """A clear DataFormatError for a path that is missing, not a file, or empty."""
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if not path.is_file():
        raise DataFormatError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "file is empty")


TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


def read_table_records(path: Path) -> list[Record]:
    """Rows of a .parquet or .csv file (through HF `datasets`); `line` is the 1-based row number."""
    import datasets

    try:
        table = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # pyarrow / pandas parse errors: report them against the file
        raise DataFormatError(path, f"cannot read as {TABLE_SUFFIXES[path.suffix]}: {e}") from None
    return [Record(str(path), i + 1, row) for i, row in enumerate(table)]


def read_json_records(path: str | Path) -> list[Record]:
    """Records of a .jsonl file (one JSON object per line), a .json file (an array of objects), or
    the rows of a .parquet / .csv table."""
    path = Path(path)
    check_file(path)
    if path.suffix in TABLE_SUFFIXES:
        records = read_table_records(path)
        if not records:
            raise DataFormatError(path, "no records in file")
        return records
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
    check_file(path)
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

# Speaker names of sharegpt / OpenAI / ColossalAI / LLaMA-Factory turns -> chat-template roles.
# function_call is the assistant's (trained) tool call; observation is the tool's reply (not trained).
ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool",
}


def turns_to_messages(record: Record, field: str, turns) -> list[dict]:
    """A list of `{from|role, value|content}` objects (any of the spellings above) -> messages."""
    if not isinstance(turns, list):
        raise DataFormatError(record.path, f"expected a list of turns, got {type(turns).__name__}",
                              line=record.line, field=field)
    messages = []
    for k, turn in enumerate(turns):
        name = f"{field}[{k}]"
        if not isinstance(turn, dict):
            raise DataFormatError(record.path, "expected an object", line=record.line, field=name)
        speaker = turn.get("from", turn.get("role"))
        if speaker not in ROLES:
            raise DataFormatError(record.path, f"unknown speaker {speaker!r} (expected one of {sorted(ROLES)})",
                                  line=record.line, field=f"{name}.from")
        key = next((k for k in ("value", "content") if k in turn), "value" if field == "conversations" else "content")
        messages.append({"role": ROLES[speaker], "content": _as_str(record, f"{name}.{key}", turn.get(key))})
    return messages


def sharegpt_messages(record: Record) -> list[dict]:
    """`{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
    "system"?: str, "tools"?: str}` (tools are kept in the record for templates that render them)."""
    messages = turns_to_messages(record, "conversations", _field(record, "conversations", list))
    system = record.data.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": _as_str(record, "system", system)})
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
    """OpenAI `{"messages": [{"role", "content"}]}` and ColossalAI `{"messages": [{"from", "content"}]}`."""
    return turns_to_messages(record, "messages", _field(record, "messages", list))


def colossal_single_messages(record: Record) -> list[dict]:
    """ColossalAI single turn `{"source", "target", "category"?}`: source is the prompt, target the reply."""
    return [{"role": "user", "content": _field(record, "source", str)},
            {"role": "assistant", "content": _field(record, "target", str)}]


CONVERSATION_READERS: dict[str, Callable[[Record], list[dict]]] = {
    "sharegpt": sharegpt_messages,
    "alpaca": alpaca_messages,
    "messages": messages_messages,
    "colossal_single": colossal_single_messages,
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
    if "source" in keys and "target" in keys:
        return "colossal_single"
    raise DataFormatError(record.path, f"cannot tell the conversation format from keys {sorted(keys)}; "
                          "expected 'conversations' (sharegpt), 'messages', 'instruction'+'output' "
                          "(alpaca) or 'source'+'target' (ColossalAI), or set data.format", line=record.line)


def read_conversation(record: Record, fmt: str = "auto") -> list[dict]:
    return _read(record, fmt, CONVERSATION_READERS, detect_conversation_format, "conversation")


def iter_conversations(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, list[dict]]]:
    return ((record, read_conversation(record, fmt)) for record in records)


def _read(record: Record, fmt: str, readers: dict, detect: Callable[[Record], str], kind: str):
    """reader(record), the reader named by `fmt` or detected from the record's keys."""
    name = detect(record) if fmt == "auto" else fmt
    if name not in readers:
        raise DataFormatError(record.path, f"unknown {kind} format {name!r}; known: {sorted(readers)}")
    return readers[name](record)


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
        messages = turns_to_messages(record, "prompt", prompt)
    return Pair(messages, _reply(record, "chosen"), _reply(record, "rejected"))


def colossal_pair(record: Record) -> Pair:
    """ColossalAI: `{"context": [messages], "chosen": [messages], "rejected": [messages]}`."""
    return Pair(turns_to_messages(record, "context", _field(record, "context", list)),
                _reply(record, "chosen"), _reply(record, "rejected"))


def implicit_prompt_pair(record: Record) -> Pair:
    """TRL implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, two whole
    conversations sharing every turn but the final assistant reply."""
    chosen = turns_to_messages(record, "chosen", record.data["chosen"])
    rejected = turns_to_messages(record, "rejected", record.data["rejected"])
    last_roles = {chosen[-1]["role"], rejected[-1]["role"]} if chosen and rejected else set()
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or last_roles != {"assistant"}:
        raise DataFormatError(record.path, "chosen and rejected conversations must share every turn but a final "
                              "assistant reply", line=record.line, field="chosen")
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(record: Record, field: str) -> list[dict]:
    text = _field(record, field, str)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataFormatError(record.path, "expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
                              line=record.line, field=field)
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def hh_rlhf_pair(record: Record) -> Pair:
    """Anthropic hh-rlhf: `{"chosen": transcript, "rejected": transcript}`; the prompt is the shared
    prefix up to the final Assistant turn, the replies are the two final Assistant turns."""
    chosen, rejected = _hh_turns(record, "chosen"), _hh_turns(record, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        raise DataFormatError(record.path, "the two transcripts must differ only in their final Assistant turn",
                              line=record.line, field="rejected")
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


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
    "colossal_pair": colossal_pair,
    "implicit_prompt": implicit_prompt_pair,
    "hh_rlhf": hh_rlhf_pair,
}


def detect_pair_format(record: Record) -> str:
    keys = record.data.keys()
    if "response_chosen" in keys:
        return "medicalgpt_original"
    if "completion" in keys and "label" in keys:
        raise DataFormatError(record.path, "KTO-style unpaired data ({prompt, completion, label}) is not supported by "
                              "the pairwise stages (rm, dpo): they need a chosen and a rejected reply per prompt",
                              line=record.line)
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_pair"
        if "prompt" in keys:
            return "prompt_pair"
        if "context" in keys:
            return "colossal_pair"
        if isinstance(record.data["chosen"], list):
            return "implicit_prompt"
        if isinstance(record.data["chosen"], str) and "\n\nHuman: " in record.data["chosen"]:
            return "hh_rlhf"
    raise DataFormatError(record.path, f"cannot tell the preference format from keys {sorted(keys)}; expected "
                          "'conversations'|'prompt'|'context' + 'chosen' + 'rejected', 'question' + "
                          "'response_chosen' + 'response_rejected', or hh-rlhf transcripts, or set data.format",
                          line=record.line)


def read_pair(record: Record, fmt: str = "auto") -> Pair:
    pair = _read(record, fmt, PAIR_READERS, detect_pair_format, "preference")
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            raise DataFormatError(record.path, "empty reply", line=record.line, field=name)
    if pair.chosen == pair.rejected:
        raise DataFormatError(record.path, "chosen and rejected are identical", line=record.line, field="rejected")
    return pair


def iter_pairs(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Pair]]:
    return ((record, read_pair(record, fmt)) for record in records)


# --- RL prompts ----------------------------------------------------------------------------------

class Prompt(NamedTuple):
    messages: list[dict]  # the conversation to continue
    answer: str | None  # reference answer for rule rewards, when the data has one
    fields: dict  # the whole record, for reward functions that need more


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def reference_answer(answer) -> str | None:
    """The reference answer: gsm8k-style solutions ending in `#### 42` give "42" (commas dropped)."""
    if answer is None:
        return None
    text = str(answer)
    match = _GSM8K_ANSWER.search(text)
    return match.group(1).replace(",", "") if match else text.strip()


def prompt_record(record: Record) -> Prompt:
    """`{"prompt": str | messages}`, `{"question", "answer"?}`, `{"messages" | "conversations"}`
    (a final assistant turn, if any, is the reference answer), plus any other fields."""
    data = record.data
    answer = data.get("answer", data.get("reference", data.get("solution")))
    if "prompt" in data:
        prompt = data["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else turns_to_messages(record, "prompt", prompt)
    elif "question" in data:
        messages = [{"role": "user", "content": _field(record, "question", str)}]
    elif "messages" in data or "conversations" in data:
        messages = messages_messages(record) if "messages" in data else sharegpt_messages(record)
        if messages and messages[-1]["role"] == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
    else:
        raise DataFormatError(record.path, f"cannot find a prompt in keys {sorted(data)}; expected 'prompt', "
                              "'question', 'messages' or 'conversations'", line=record.line)
    if not messages or messages[-1]["role"] != "user":
        raise DataFormatError(record.path, "the prompt must end with a user turn", line=record.line)
    return Prompt(messages, reference_answer(answer), dict(data))
