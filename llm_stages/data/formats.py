"""Records -> the kind of example a stage reads: text, a conversation, a preference pair, unpaired
feedback, or an RL prompt.

Each record first goes through `prepare`: a bare list of messages becomes `{"messages": [...]}` and
`data.columns` renames the file's fields to the names below (as LLaMA-Factory's `columns`), e.g.
`data.columns={prompt: problem}`. The schema is then detected from the keys (or named by
`data.format`); when it cannot be told, the error lists the keys and an override that would work.
Messages come out in one shape (see `messages.py`) and render through the tokenizer's chat template.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from llm_stages.data.messages import content_parts, parse_tools, text_value, to_messages
from llm_stages.data.sources import Record, check_file, read_records, read_text  # noqa: F401  (re-exported)
from llm_stages.errors import ConfigError, DataFormatError
from llm_stages.rewards import final_answer

# The field names `data.columns` maps onto (the keys every reader below understands).
ROLE_NAMES = {"text", "messages", "conversations", "system", "tools", "instruction", "input", "output", "history",
              "source", "target", "prompt", "question", "answer", "chosen", "rejected", "context", "margin",
              "completion", "label", "response_chosen", "response_rejected"}


def read_json_records(path: str | Path) -> list[Record]:
    """Every record of a file, folder or dataset (see `sources.read_records`)."""
    return read_records(path)


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


# --- text documents ------------------------------------------------------------------------------

def read_text_documents(path: str | Path) -> list[Record]:
    """Documents of a text file (compressed too), separated by one or more blank lines (a file
    without blank lines is one document per line)."""
    path = Path(path)
    check_file(path)
    lines = read_text(path).splitlines()
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


def text_of(record: Record) -> str:
    """The document text of a text-file document or a `{"text": ...}` record."""
    if isinstance(record.data, str):
        return record.data
    if "text" not in record.data:
        raise _cannot_tell(record, "text", "a 'text' field")
    return text_value(record, "text", record.data["text"])


# --- conversations -------------------------------------------------------------------------------

class Conversation(NamedTuple):
    messages: list[dict]
    tools: list[dict] | None = None  # tool schemas the template shows (in the system turn, for Qwen2.5)


def _with_system(record: Record, messages: list[dict]) -> list[dict]:
    """The record's `system` field, when set, as the first turn (unless the turns have one)."""
    system = record.data.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": text_value(record, "system", system)}] + messages
    return messages


def _tools(record: Record) -> list[dict] | None:
    return parse_tools(record, record.data.get("tools"))


def sharegpt_messages(record: Record) -> list[dict]:
    """`{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}],
    "system"?, "tools"?}`."""
    return _with_system(record, to_messages(record, "conversations", _field(record, "conversations")))


def messages_messages(record: Record) -> list[dict]:
    """OpenAI `{"messages": [{"role", "content", "tool_calls"?}]}`, ColossalAI `{"messages": [{"from", "content"}]}`."""
    return _with_system(record, to_messages(record, "messages", _field(record, "messages")))


def alpaca_messages(record: Record) -> list[dict]:
    """`{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`."""
    instruction = text_value(record, "instruction", _field(record, "instruction"))
    output = text_value(record, "output", _field(record, "output"))
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
    return _with_system(record, messages)


def colossal_single_messages(record: Record) -> list[dict]:
    """ColossalAI single turn `{"source", "target"}`: source is the prompt, target the reply."""
    return _with_system(record, [{"role": "user", "content": text_value(record, "source", _field(record, "source"))},
                                 {"role": "assistant", "content": text_value(record, "target", _field(record, "target"))}])


def prompt_completion_messages(record: Record) -> list[dict]:
    """TRL `{"prompt": str | messages, "completion": str | messages}` (no label: that is unpaired feedback)."""
    return _prompt_messages(record) + _replies(record, "completion")


CONVERSATION_READERS: dict[str, Callable[[Record], list[dict]]] = {
    "sharegpt": sharegpt_messages,
    "alpaca": alpaca_messages,
    "messages": messages_messages,
    "colossal_single": colossal_single_messages,
    "prompt_completion": prompt_completion_messages,
}


def detect_conversation_format(record: Record) -> str:
    keys = record.data.keys()
    if "label" in keys and ("completion" in keys or "messages" in keys):
        raise _unpaired_elsewhere(record)
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
    raise _cannot_tell(record, "conversation", "'conversations' (sharegpt), 'messages', 'instruction' + 'output' "
                       "(alpaca), 'prompt' + 'completion' or 'source' + 'target'")


def read_conversation(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Conversation:
    record = prepare(record, columns)
    return Conversation(_read(record, fmt, CONVERSATION_READERS, detect_conversation_format, "conversation"),
                        _tools(record))


def iter_conversations(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Conversation]]:
    return ((record, read_conversation(record, fmt)) for record in records)


# --- preference pairs ----------------------------------------------------------------------------

class Pair(NamedTuple):
    prompt: list[dict]  # messages before the compared reply
    chosen: dict  # the preferred assistant message (content, and reasoning / tool calls when given)
    rejected: dict
    tools: list[dict] | None = None


def _replies(record: Record, name: str) -> list[dict]:
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


def _reply(record: Record, name: str) -> dict:
    replies = _replies(record, name)
    if len(replies) > 1:
        raise DataFormatError(record.path, "expected one assistant reply, got several turns", line=record.line, field=name)
    return replies[0]


def _prompt_messages(record: Record) -> list[dict]:
    prompt = _field(record, "prompt")
    if isinstance(prompt, (list, dict)):
        return _with_system(record, to_messages(record, "prompt", prompt))
    return _with_system(record, [{"role": "user", "content": text_value(record, "prompt", prompt)}])


def sharegpt_pair(record: Record) -> Pair:
    """MedicalGPT / LLaMA-Factory: `{"conversations": [...prompt...], "chosen": ..., "rejected": ...}`."""
    return Pair(sharegpt_messages(record), _reply(record, "chosen"), _reply(record, "rejected"))


def prompt_pair(record: Record) -> Pair:
    """TRL: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`. Replies
    that are whole conversations (UltraFeedback's binarized layout repeats the prompt in them) are
    read as two conversations sharing every turn but the last."""
    chosen, rejected = _replies(record, "chosen"), _replies(record, "rejected")
    if (len(chosen) > 1 or len(rejected) > 1) and any(m["role"] == "user" for m in chosen):
        return implicit_prompt_pair(record)
    return Pair(_prompt_messages(record), _reply(record, "chosen"), _reply(record, "rejected"))


def colossal_pair(record: Record) -> Pair:
    """ColossalAI: `{"context": [messages], "chosen": [messages], "rejected": [messages]}`."""
    return Pair(_with_system(record, to_messages(record, "context", _field(record, "context"))),
                _reply(record, "chosen"), _reply(record, "rejected"))


def implicit_prompt_pair(record: Record) -> Pair:
    """Two whole conversations under `chosen` / `rejected` (TRL's implicit prompt; any names through
    `data.columns`) sharing every turn but the final assistant reply."""
    chosen = to_messages(record, "chosen", _field(record, "chosen"))
    rejected = to_messages(record, "rejected", _field(record, "rejected"))
    last_roles = {chosen[-1]["role"], rejected[-1]["role"]} if chosen and rejected else set()
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or last_roles != {"assistant"}:
        raise DataFormatError(record.path, "chosen and rejected conversations must share every turn but a final "
                              "assistant reply", line=record.line, field="chosen")
    return Pair(_with_system(record, chosen[:-1]), chosen[-1], rejected[-1])


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_turns(record: Record, field: str, text: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataFormatError(record.path, "expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
                              line=record.line, field=field)
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def hh_rlhf_pair(record: Record) -> Pair:
    """Anthropic hh-rlhf: `{"chosen": transcript, "rejected": transcript}`. The prompt is the
    transcript up to the last `Assistant:` the two share; each reply is the rest of its transcript
    (normally the final Assistant turn, possibly empty; a few records diverge a turn earlier, and
    then the reply runs on through the later turns, as the rated continuation)."""
    chosen = text_value(record, "chosen", _field(record, "chosen"))
    rejected = text_value(record, "rejected", _field(record, "rejected"))
    start = os.path.commonprefix([chosen, rejected]).rfind(_HH_ASSISTANT)
    if start < 0:
        raise DataFormatError(record.path, "the two transcripts share no turn up to an 'Assistant:'",
                              line=record.line, field="rejected")
    end = start + len(_HH_ASSISTANT)
    if chosen[end:end + 1] == " " and rejected[end:end + 1] == " ":
        end += 1
    prompt = _hh_turns(record, "chosen", chosen[:start])
    if prompt[-1]["role"] != "user":
        raise DataFormatError(record.path, "the shared transcript must end with a Human turn", line=record.line,
                              field="chosen")
    return Pair(prompt, {"role": "assistant", "content": chosen[end:]}, {"role": "assistant", "content": rejected[end:]})


def medicalgpt_original_pair(record: Record) -> Pair:
    """MedicalGPT original: `{"system"?, "history"?: [[q, a]], "question", "response_chosen", "response_rejected"}`."""
    as_alpaca = Record(record.path, record.line, {"instruction": _field(record, "question"), "output": "",
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
    if "label" in keys and ("completion" in keys or "messages" in keys):
        raise _unpaired_elsewhere(record)
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_pair"
        if "prompt" in keys:
            return "prompt_pair"
        if "context" in keys:
            return "colossal_pair"
        if isinstance(record.data["chosen"], list):
            return "implicit_prompt"
        if isinstance(record.data["chosen"], str) and "\n\nHuman:" in record.data["chosen"]:
            return "hh_rlhf"
    raise _cannot_tell(record, "preference", "'conversations'|'prompt'|'context' + 'chosen' + 'rejected', two "
                       "conversations under 'chosen' + 'rejected', 'question' + 'response_chosen' + "
                       "'response_rejected', or hh-rlhf transcripts")


def read_pair(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Pair:
    """A preference pair. Empty replies are valid (the end-of-turn token is what is scored); whether
    the two replies are identical is the DataModule's to count and skip."""
    record = prepare(record, columns)
    pair = _read(record, fmt, PAIR_READERS, detect_pair_format, "preference")
    return pair._replace(tools=_tools(record))


def iter_pairs(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Pair]]:
    return ((record, read_pair(record, fmt)) for record in records)


# --- unpaired feedback (KTO) ---------------------------------------------------------------------

class Unpaired(NamedTuple):
    prompt: list[dict]
    completion: dict  # the assistant reply the label judges
    label: bool  # True: desirable
    tools: list[dict] | None = None


def prompt_completion_label(record: Record) -> Unpaired:
    """TRL KTO: `{"prompt": str | messages, "completion": str | messages, "label": bool}`."""
    return Unpaired(_prompt_messages(record), _reply(record, "completion"), _label(record))


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


def detect_unpaired_format(record: Record) -> str:
    keys = record.data.keys()
    if "label" in keys and "completion" in keys:
        return "prompt_completion_label"
    if "label" in keys and "messages" in keys:
        return "messages_label"
    raise _cannot_tell(record, "unpaired feedback", "'prompt' + 'completion' + 'label' or 'messages' + 'label'")


def read_unpaired(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Unpaired:
    record = prepare(record, columns)
    return _read(record, fmt, UNPAIRED_READERS, detect_unpaired_format, "unpaired feedback")._replace(tools=_tools(record))


def _label(record: Record) -> bool:
    value = _field(record, "label")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataFormatError(record.path, f"expected true/false (or 1/0), got {value!r:.40}", line=record.line, field="label")


def _unpaired_elsewhere(record: Record) -> DataFormatError:
    return DataFormatError(record.path, "unpaired feedback ({prompt, completion, label} or messages + label) is read by "
                           "the KTO stage, which is not built yet; rm and dpo need a chosen and a rejected reply per "
                           "prompt, sft trains on conversations without a label", line=record.line)


# --- RL prompts ----------------------------------------------------------------------------------

class Prompt(NamedTuple):
    messages: list[dict]  # the conversation to continue
    answer: str | None  # reference answer for rule rewards, when the data has one
    fields: dict  # the whole record, for reward functions that need more
    tools: list[dict] | None = None


PROMPT_KEYS = ("prompt", "question", "problem", "query", "instruction")
ANSWER_KEYS = ("answer", "reference", "gt_answer", "ground_truth", "final_answer", "solution", "output", "target")

_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def reference_answer(answer) -> str | None:
    """The final answer of a reference (`rewards.final_answer`: gsm8k's `#### 42`, a MATH
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
        messages = _with_system(record, messages)
    elif "messages" in data or "conversations" in data:
        messages = messages_messages(record) if "messages" in data else sharegpt_messages(record)
        if messages and messages[-1]["role"] == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
    else:
        raise _cannot_tell(record, "prompt", f"one of {list(PROMPT_KEYS)}, 'messages' or 'conversations'")
    if not messages or messages[-1]["role"] != "user":
        raise DataFormatError(record.path, "the prompt must end with a user turn", line=record.line)
    return Prompt(messages, reference_answer(answer), dict(data), _tools(record))


# --- helpers -------------------------------------------------------------------------------------

def _read(record: Record, fmt: str, readers: dict, detect: Callable[[Record], str], kind: str):
    """reader(record), the reader named by `fmt` or detected from the record's keys."""
    name = detect(record) if fmt in (None, "auto") else fmt
    if name not in readers:
        raise DataFormatError(record.path, f"unknown {kind} format {name!r} (data.format); known: {sorted(readers)}")
    return readers[name](record)


def _field(record: Record, name: str):
    if name not in record.data or record.data[name] is None:
        raise DataFormatError(record.path, f"missing (record keys: {sorted(record.data)})", line=record.line, field=name)
    return record.data[name]


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


def _cannot_tell(record: Record, kind: str, expected: str) -> DataFormatError:
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
