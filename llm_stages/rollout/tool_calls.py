"""Tool calls in a model's reply, read in its chat template's own format.

One parser per format, each turning the decoded assistant turn into its text, its well-formed calls
and one message per malformed call (the model reads that message as the tool turn, so a broken call
teaches rather than crashes):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number per turn (Qwen2.5,
  Qwen3, Hermes; also every template that cannot render tool calls, since `data.template` writes
  them into such templates' text in this markup);
- `qwen3_xml`: `<tool_call><function=name><parameter=key>value</parameter></function></tool_call>`
  (Qwen3.5, Qwen3-Coder);
- `llama3_json`: a bare `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`
  (Llama 3.1 / 3.2); several calls may be separated by `;`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}`
  per call (newer Mistral tokenizers).

What a parser reads: the reply decoded with the special tokens dropped except the format's own
markers (`decode_turn`): `<tool_call>` may be plain text or an added token, but `[TOOL_CALLS]` and
`<|python_tag|>` are special tokens that `skip_special_tokens=True` would erase.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple, Protocol

from llm_stages.errors import ConfigError


class ToolCall(NamedTuple):
    name: str
    arguments: dict


class ParsedTurn(NamedTuple):
    content: str  # the turn's text with the tool-call markup removed (stripped)
    calls: list[ToolCall]  # well-formed calls, in order
    failures: list[str]  # one message per malformed call: the text the model reads as the tool turn


class ToolCallParser(Protocol):
    name: str
    markers: tuple[str, ...]  # the format's tokens that decoding must keep even when they are special tokens

    def parse(self, text: str) -> ParsedTurn: ...


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _failure(number: int, what: str, expected: str) -> str:
    return f"error: tool call {number}: {what}; expected {expected}"


def _call_from_object(value, number: int, expected: str) -> ToolCall | str:
    """A call from a decoded JSON value `{"name": str, "arguments" | "parameters": object}`, or the
    failure message. Arguments written as a JSON string holding an object (the OpenAI wire shape) are read."""
    if not isinstance(value, dict):
        return _failure(number, f"got {_JSON_TYPES.get(type(value), 'a value')} instead of a JSON object", expected)
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        return _failure(number, 'no "name" string', expected)
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        kind = _JSON_TYPES.get(type(arguments), "a value")
        return _failure(number, f'the arguments of {name} must be a JSON object, got {kind}', expected)
    return ToolCall(name.strip(), arguments)


def _json_failure(number: int, error: json.JSONDecodeError, expected: str) -> str:
    return _failure(number, f"not valid JSON ({error})", expected)


class _Collector:
    """Calls and failures in order of appearance, numbered as the model wrote them."""

    def __init__(self):
        self.calls: list[ToolCall] = []
        self.failures: list[str] = []
        self.number = 0

    def add(self, result: ToolCall | str) -> None:
        (self.calls if isinstance(result, ToolCall) else self.failures).append(result)

    def next_number(self) -> int:
        self.number += 1
        return self.number


def _tagged_blocks(text: str, open_tag: str, close_tag: str):
    """(content outside the blocks, [(body, closed)]) for `open_tag body close_tag` blocks. A block
    left open runs to the next opening tag or the end of the text."""
    outside, blocks, position = [], [], 0
    while (start := text.find(open_tag, position)) >= 0:
        outside.append(text[position:start])
        body_start = start + len(open_tag)
        end, reopened = text.find(close_tag, body_start), text.find(open_tag, body_start)
        if end < 0 or 0 <= reopened < end:
            stop = reopened if reopened >= 0 else len(text)
            blocks.append((text[body_start:stop], False))
            position = stop
        else:
            blocks.append((text[body_start:end], True))
            position = end + len(close_tag)
    outside.append(text[position:])
    return "".join(outside).strip(), blocks


class HermesParser:
    name = "hermes"
    markers = ("<tool_call>", "</tool_call>")
    expected = '<tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>'

    def parse(self, text: str) -> ParsedTurn:
        content, blocks = _tagged_blocks(text, "<tool_call>", "</tool_call>")
        found = _Collector()
        for body, closed in blocks:
            number = found.next_number()
            if not closed:
                found.add(_failure(number, "<tool_call> is not closed by </tool_call>", self.expected))
                continue
            try:
                value = json.loads(body)
            except json.JSONDecodeError as e:
                found.add(_json_failure(number, e, self.expected))
                continue
            found.add(_call_from_object(value, number, self.expected))
        return ParsedTurn(content, found.calls, found.failures)


_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _xml_value(raw: str):
    """A parameter's text as a JSON value where it reads as one (numbers, booleans, objects), else
    the text: the format writes `7` and `"7"` alike, so a string of digits comes back as a number."""
    value = raw.removeprefix("\n").removesuffix("\n")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class Qwen3XmlParser:
    name = "qwen3_xml"
    markers = ("<tool_call>", "</tool_call>")
    expected = "<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>"

    def parse(self, text: str) -> ParsedTurn:
        content, blocks = _tagged_blocks(text, "<tool_call>", "</tool_call>")
        found = _Collector()
        for body, closed in blocks:
            number = found.next_number()
            function = _FUNCTION.fullmatch(body)
            if not closed:
                found.add(_failure(number, "<tool_call> is not closed by </tool_call>", self.expected))
            elif not function:
                found.add(_failure(number, "no <function=NAME>...</function> block", self.expected))
            elif _PARAMETER.sub("", function.group(2)).strip():
                found.add(_failure(number, f"text outside <parameter=KEY>...</parameter> in {function.group(1)}",
                                   self.expected))
            else:
                arguments = {key.strip(): _xml_value(raw) for key, raw in _PARAMETER.findall(function.group(2))}
                found.add(ToolCall(function.group(1).strip(), arguments))
        return ParsedTurn(content, found.calls, found.failures)


_LLAMA_CALL_START = re.compile(r'\s*\{\s*"name"\s*:')


class Llama3JsonParser:
    """A turn is a call when it starts with `<|python_tag|>` or with `{"name":`; any other text is
    an answer (a reply that merely contains JSON is not taken for a call)."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)
    expected = '{"name": "<tool name>", "parameters": {...}}'

    def parse(self, text: str) -> ParsedTurn:
        tag = text.find("<|python_tag|>")
        if tag >= 0:
            before, calls_text = text[:tag], text[tag + len("<|python_tag|>"):]
        elif _LLAMA_CALL_START.match(text):
            before, calls_text = "", text
        else:
            return ParsedTurn(text.strip(), [], [])
        found, rest = _Collector(), _json_sequence(calls_text, self.expected, separators=";")
        for result in rest.results:
            found.add(result)
        content = " ".join(part for part in (before.strip(), rest.leftover) if part)
        return ParsedTurn(content, found.calls, found.failures)


class _Sequence(NamedTuple):
    results: list  # ToolCall | failure message, in order
    leftover: str  # text after the last JSON value that is not JSON (end-of-turn text), stripped


def _json_sequence(text: str, expected: str, *, separators: str, first_number: int = 1) -> _Sequence:
    """JSON objects one after another (separated by whitespace or `separators`), each a call. An
    array holds one call per item. Text that does not start a JSON value ends the sequence: a
    failure when nothing was read yet, else left over (trailing text)."""
    decoder, results, position, number = json.JSONDecoder(), [], 0, first_number
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position >= len(text):
            return _Sequence(results, "")
        if results and text[position] not in "[{":
            return _Sequence(results, text[position:].strip())
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            results.append(_json_failure(number, e, expected))
            return _Sequence(results, "")
        for item in value if isinstance(value, list) else [value]:
            results.append(_call_from_object(item, number, expected))
            number += 1


class MistralParser:
    name = "mistral"
    markers = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    expected = '[TOOL_CALLS][{"name": "<tool name>", "arguments": {...}}]'

    def parse(self, text: str) -> ParsedTurn:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return ParsedTurn(text.strip(), [], [])
        found, leftovers = _Collector(), [text[:start].strip()]
        for chunk in text[start:].split("[TOOL_CALLS]")[1:]:
            if "[ARGS]" in chunk:  # name[ARGS]{...}, optionally name[CALL_ID]id[ARGS]{...}
                name, _, arguments = chunk.partition("[ARGS]")
                name = name.partition("[CALL_ID]")[0].strip()
                number = found.next_number()
                try:
                    value, end = json.JSONDecoder().raw_decode(arguments.strip())
                except json.JSONDecodeError as e:
                    found.add(_json_failure(number, e, self.expected))
                    continue
                found.add(_call_from_object({"name": name, "arguments": value}, number, self.expected))
                leftovers.append(arguments.strip()[end:].strip())
            else:
                sequence = _json_sequence(chunk, self.expected, separators=",", first_number=found.number + 1)
                for result in sequence.results:
                    found.next_number()
                    found.add(result)
                leftovers.append(sequence.leftover)
        return ParsedTurn(" ".join(part for part in leftovers if part), found.calls, found.failures)


PARSERS: dict[str, ToolCallParser] = {parser.name: parser for parser in (
    HermesParser(), Qwen3XmlParser(), Llama3JsonParser(), MistralParser())}


def parser_named(name: str) -> ToolCallParser:
    """The parser `rollout.episode.tool_parser=<name>` asks for."""
    if name not in PARSERS:
        raise ConfigError(f"rollout.episode.tool_parser={name}: no such tool-call parser; "
                          f"use one of {', '.join(PARSERS)} (or leave it unset to follow the chat template)")
    return PARSERS[name]


PROBE_CALL = ToolCall("probe_tool", {"count": 2, "word": "x"})
_chosen: dict[tuple, ToolCallParser] = {}


def parser_for(tokenizer) -> ToolCallParser:
    """The parser for this tokenizer's chat template: the one that reads back the call the template
    itself renders for a probe conversation. Rendering goes through `data.template.template_messages`,
    so a template that cannot render tool calls gets the hermes markup written there, and hermes here."""
    from llm_stages.data.template import render_text, template_messages, turn_end

    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "") or ""))
    if key in _chosen:
        return _chosen[key]
    call = {"type": "function", "id": "probe0001",  # Mistral templates refuse calls without a 9-character id
            "function": {"name": PROBE_CALL.name, "arguments": PROBE_CALL.arguments}}
    messages, _ = template_messages(tokenizer, [{"role": "user", "content": "?"},
                                                {"role": "assistant", "content": "", "tool_calls": [call]}], None)
    whole = render_text(tokenizer, messages)
    prompt = render_text(tokenizer, messages[:1], add_generation_prompt=True)
    turn = whole[len(prompt):] if whole.startswith(prompt) else whole
    terminator = turn_end(tokenizer).terminator
    turn = turn.split(terminator)[0] if terminator else turn
    for parser in PARSERS.values():
        parsed = parser.parse(turn)
        if parsed.calls == [PROBE_CALL] and not parsed.failures:
            _chosen[key] = parser
            return parser
    raise ConfigError(f"the chat template writes a tool call as {turn.strip()[:120]!r}, a format no tool-call parser "
                      f"reads; set rollout.episode.tool_parser to one of {', '.join(PARSERS)} to choose the format "
                      "the model's calls are read in")


def decode_turn(tokenizer, ids, parser: ToolCallParser) -> str:
    """A reply's token ids as the parser reads them: special tokens dropped (end of turn, padding),
    except the parser's markers, which some tokenizers hold as special tokens."""
    ids = [int(i) for i in ids]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False)}
    added = tokenizer.get_added_vocab()
    keep = {added[marker] for marker in parser.markers if marker in added}
    return tokenizer.decode([i for i in ids if i not in special or i in keep], skip_special_tokens=False)
