"""One message shape for every spelling of a conversation turn.

Out of here comes what transformers chat templates take: `{"role", "content": str}` plus, when the
data has them, `reasoning_content` (thinking text), `tool_calls` (OpenAI shape, arguments as a dict),
`tool_call_id` / `name` on tool replies, and `train: False` for an assistant turn not to be trained.

In: sharegpt `{from, value}` and OpenAI/ColossalAI `{role|from, content}` turns; content as a string,
a number, or a list of parts (`{"type": "text", "text"|"value"}`, reasoning and tool_call parts;
image/audio parts are refused); sharegpt `function_call` / `observation` turns and OpenAI `tool_calls` / `role: "tool"`;
per-turn `loss_weight` / `train` / `weight` flags (0 or false: that turn is not trained).
"""

from __future__ import annotations

import json
from typing import NamedTuple

from llm_stages.errors import DataFormatError

# Speaker names -> chat-template roles. function_call is the assistant's (trained) tool call;
# observation is the tool's reply (never trained).
ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool",
}
TEXT_PARTS = {"text", "input_text", "output_text"}
REASONING_PARTS = {"reasoning", "thinking", "reasoning_content"}
TOOL_CALL_PARTS = {"tool_call", "function_call"}
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "file", "image_file"}
TRAIN_FLAGS = ("loss_weight", "train", "weight")


def text_value(record, field: str, value, *, allow_none: bool = False) -> str:
    """A text field: a string, or a number written as text (CSV cells, `"output": 42`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None and allow_none:
        return ""
    raise DataFormatError(record.path, f"expected a string, got {type(value).__name__}", line=record.line, field=field)


class Content(NamedTuple):
    text: str
    reasoning: str | None = None  # reasoning / thinking parts
    tool_calls: list | None = None  # tool_call parts (LLaMA-Factory's `{"type": "tool_call", "value": json}`)


def content_parts(record, field: str, content) -> Content:
    """A message's content: a string (or number), or a list of parts joined by newlines."""
    if not isinstance(content, list):
        return Content(text_value(record, field, content, allow_none=True))
    texts, reasoning, calls = [], [], []
    for k, part in enumerate(content):
        name = f"{field}[{k}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DataFormatError(record.path, f"expected a content part object, got {type(part).__name__}",
                                  line=record.line, field=name)
        kind = part.get("type", "text")
        if kind in MEDIA_PARTS:
            raise DataFormatError(record.path, f"a {kind!r} part: the stages train text-only models; drop the part "
                                  "or the record (data.on_bad_record=skip)", line=record.line, field=name)
        key = next((k for k in ("text", "value", kind, "content") if k in part), None)
        if kind in TOOL_CALL_PARTS and key is not None:
            value = part[key]
            for call in (value if isinstance(value, list) else [value]):
                calls.append(tool_call(record, f"{name}.{key}", call))
            continue
        if kind not in TEXT_PARTS | REASONING_PARTS or key is None:
            raise DataFormatError(record.path, f"unknown content part {part!r:.80}; expected "
                                  "{'type': 'text', 'text': ...} (or 'value')", line=record.line, field=name)
        (reasoning if kind in REASONING_PARTS else texts).append(text_value(record, f"{name}.{key}", part[key]))
    return Content("\n".join(texts), "\n".join(reasoning) if reasoning else None, calls or None)


def tool_call(record, field: str, call) -> dict:
    """One tool call in the OpenAI shape, `{"type": "function", "function": {"name", "arguments": dict}}`,
    from that shape or a bare `{"name", "arguments"|"parameters"}` (JSON strings are parsed)."""
    if isinstance(call, str):
        call = _json(record, field, call)
    if not isinstance(call, dict):
        raise DataFormatError(record.path, f"expected a tool call object, got {type(call).__name__}",
                              line=record.line, field=field)
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataFormatError(record.path, "a tool call needs a 'name' (OpenAI: {'type': 'function', 'function': "
                              "{'name', 'arguments'}})", line=record.line, field=field)
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # templates print string arguments as they are
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def parse_tools(record, value) -> list[dict] | None:
    """Tool schemas: a list, or a JSON string holding one (LLaMA-Factory's `tools` column)."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        value = _json(record, "tools", value)
    if isinstance(value, dict):
        value = [value]
    if value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataFormatError(record.path, "expected a list of tool schemas (or a JSON string of one)",
                              line=record.line, field="tools")
    return value


def to_messages(record, field: str, turns) -> list[dict]:
    """A list of turns (or a single turn object) in any of the spellings above -> messages."""
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list):
        raise DataFormatError(record.path, f"expected a list of turns, got {type(turns).__name__}",
                              line=record.line, field=field)
    return [to_message(record, f"{field}[{k}]", turn) for k, turn in enumerate(turns)]


def to_message(record, name: str, turn) -> dict:
    if not isinstance(turn, dict):
        raise DataFormatError(record.path, "expected an object", line=record.line, field=name)
    speaker = turn.get("from", turn.get("role"))
    if speaker not in ROLES:
        raise DataFormatError(record.path, f"unknown speaker {speaker!r} (expected one of {sorted(ROLES)})",
                              line=record.line, field=f"{name}.{'from' if 'from' in turn else 'role'}")
    key = next((k for k in ("value", "content", "text") if k in turn), "value" if "from" in turn else "content")
    message = {"role": ROLES[speaker]}
    if speaker == "function_call":  # sharegpt: the value is the call (or a list of calls) as JSON
        calls = _json(record, f"{name}.{key}", turn.get(key)) if isinstance(turn.get(key), str) else turn.get(key)
        calls = calls if isinstance(calls, list) else [calls]
        message.update(content="", tool_calls=[tool_call(record, f"{name}.{key}", c) for c in calls])
    else:
        content = content_parts(record, f"{name}.{key}", turn.get(key))
        message["content"] = content.text
        reasoning = content.reasoning or next((turn[k] for k in ("reasoning_content", "reasoning", "thinking")
                                               if isinstance(turn.get(k), str) and turn[k]), None)
        if reasoning:
            message["reasoning_content"] = reasoning
        if content.tool_calls:
            message["tool_calls"] = content.tool_calls
        elif turn.get("tool_calls"):
            calls = turn["tool_calls"]
            if not isinstance(calls, list):
                raise DataFormatError(record.path, "expected a list of tool calls", line=record.line,
                                      field=f"{name}.tool_calls")
            message["tool_calls"] = [tool_call(record, f"{name}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
        elif turn.get(key) is None:  # only a tool call may come without text
            raise DataFormatError(record.path, "missing message text", line=record.line, field=f"{name}.{key}")
    for k in ("tool_call_id", "name"):
        if message["role"] == "tool" and isinstance(turn.get(k), str):
            message[k] = turn[k]
    flag = next((k for k in TRAIN_FLAGS if k in turn), None)
    if flag is not None and not _truthy(turn[flag]):
        message["train"] = False
    return message


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "0.0", "false", "no", "")
    return bool(value)


def _json(record, field: str, text):
    if not isinstance(text, str):
        raise DataFormatError(record.path, f"expected JSON text, got {type(text).__name__}", line=record.line, field=field)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(record.path, f"invalid JSON: {e.msg}", line=record.line, field=field) from None
