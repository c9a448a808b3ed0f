"""Tool calls read back from real chat-template renderings (TRL's offline copies of what model
families ship), through token ids as a model would write them; malformed calls become the exact
messages the model reads; `parser_for` picks each template's format."""

import copy
from pathlib import Path

import pytest

from llm_stages.errors import ConfigError
from llm_stages.rollout.tool_calls import (PARSERS, ParsedTurn, ToolCall, decode_turn, parser_for,
                                           parser_named)

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# template -> (the special tokens it writes, the end-of-turn token, the parser that reads its calls)
FAMILIES = {
    "qwen2_5": (["<|im_start|>", "<|im_end|>"], "<|im_end|>", "hermes"),
    "qwen3": (["<|im_start|>", "<|im_end|>"], "<|im_end|>", "hermes"),
    "qwen3_5_nothink": (["<|im_start|>", "<|im_end|>"], "<|im_end|>", "qwen3_xml"),
    "llama3_1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], "<|eot_id|>", "llama3_json"),
    "llama3_2": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], "<|eot_id|>", "llama3_json"),
    "mistral": (["[INST]", "[/INST]", "[TOOL_CALLS]", "</s>"], "</s>", "mistral"),
}
# The tool-call part of Mistral-7B-Instruct-v0.3's template (TRL ships no Mistral template).
MISTRAL_TEMPLATE = """{%- for message in messages %}
{%- if message.role == 'user' %}{{ '[INST] ' + message.content + '[/INST]' }}
{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- '[TOOL_CALLS] [' }}
{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function|tojson %}{{- out[:-1] }}
{{- ', "id": "' + tool_call.id + '"}' }}{%- if not loop.last %}{{- ', ' }}{%- else %}{{- ']' + eos_token }}{%- endif %}
{%- endfor %}
{%- elif message.role == 'assistant' %}{{ ' ' + message.content + eos_token }}
{%- endif %}{%- endfor %}"""

ADD = ToolCall("add", {"a": 2, "b": 3.5, "options": {"round": True, "tags": ["x", None]}})
WEATHER = ToolCall("get_weather", {"city": "Paris", "zip": "75001"})


def family_tokenizer(base, name: str):
    specials, end, _ = FAMILIES[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = MISTRAL_TEMPLATE if name == "mistral" else (TEMPLATES / f"{name}.jinja").read_text()
    if name == "mistral":
        tok.eos_token = "</s>"
    return tok


def generated_ids(tok, name: str, calls: list[ToolCall], content: str = "") -> list[int]:
    """The token ids of the assistant turn the template renders for `calls`: what a model trained on
    this template writes after the generation prompt, end-of-turn token included."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content, "tool_calls": [
        {"type": "function", "id": f"call{i:05d}", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)]}]
    whole = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert whole.startswith(prompt)
    turn = whole[len(prompt):]
    end = FAMILIES[name][1]
    turn = turn[:turn.index(end) + len(end)]
    return tok(turn, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_call_rendered_by_the_template_reads_back(tokenizer, name):
    tok = family_tokenizer(tokenizer, name)
    parser = parser_for(tok)
    assert parser.name == FAMILIES[name][2]
    text = decode_turn(tok, generated_ids(tok, name, [ADD]), parser)
    # Qwen3's template writes an empty think block before the last reply: it stays in the text
    assert parser.parse(text) == ParsedTurn("<think>\n\n</think>" if name == "qwen3" else "", [ADD], [])


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "mistral"])
def test_several_calls_in_one_turn_read_back_in_order(tokenizer, name):
    tok = family_tokenizer(tokenizer, name)
    parser = parser_for(tok)
    text = decode_turn(tok, generated_ids(tok, name, [WEATHER, ADD], content="Let me look."), parser)
    parsed = parser.parse(text)
    assert parsed.calls == [WEATHER, ADD] and not parsed.failures
    assert parsed.calls[0].arguments["zip"] == "75001"  # a string of digits stays a string in JSON formats
    assert parsed.content == {"mistral": "",  # Mistral's template drops the text of a turn with calls
                              "qwen3": "<think>\n\n</think>\n\nLet me look."}.get(name, "Let me look.")


def test_qwen3_xml_reads_several_calls_with_values_as_json_where_they_parse(tokenizer):
    tok = family_tokenizer(tokenizer, "qwen3_5_nothink")
    text = decode_turn(tok, generated_ids(tok, "qwen3_5_nothink", [WEATHER, ADD], content="Let me look."),
                       PARSERS["qwen3_xml"])
    parsed = PARSERS["qwen3_xml"].parse(text)
    # the format writes "75001" and 75001 alike: the digits come back as a number
    assert parsed == ParsedTurn("Let me look.",
                                [WEATHER._replace(arguments={"city": "Paris", "zip": 75001}), ADD], [])


def test_the_tiny_tokenizer_gets_hermes_as_the_sft_data_writes_tool_calls(tokenizer):
    from llm_stages.data.template import render_text, template_messages

    assert parser_for(tokenizer).name == "hermes"
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    conversation = [{"role": "user", "content": "1+?"},
                    {"role": "assistant", "content": "Adding.", "tool_calls": [call]}]
    messages, _ = template_messages(tokenizer, conversation, None)
    text = render_text(tokenizer, messages)
    turn = text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    assert turn.endswith("<|im_end|>\n")
    assert PARSERS["hermes"].parse(decode_turn(tokenizer, ids, PARSERS["hermes"])) == ParsedTurn(
        "Adding.", [ToolCall("add", {"a": 1})], [])


def test_decode_turn_keeps_the_format_markers_that_are_special_tokens(tokenizer):
    tok = family_tokenizer(tokenizer, "llama3_1")
    ids = tok('<|python_tag|>{"name": "add", "parameters": {"a": 1}}<|eom_id|>', add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == '{"name": "add", "parameters": {"a": 1}}'
    assert decode_turn(tok, ids, PARSERS["llama3_json"]) == '<|python_tag|>{"name": "add", "parameters": {"a": 1}}'
    mistral = family_tokenizer(tokenizer, "mistral")
    ids = mistral('[TOOL_CALLS] [{"name": "add", "arguments": {}}]</s>', add_special_tokens=False)["input_ids"]
    assert decode_turn(mistral, ids, PARSERS["mistral"]) == '[TOOL_CALLS] [{"name": "add", "arguments": {}}]'


def test_parser_for_refuses_a_template_whose_call_format_no_parser_reads(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / "gptoss.jinja").read_text()
    with pytest.raises(ConfigError, match=r"^the chat template writes a tool call as 'to=functions\.probe_tool.*"
                                          r"set rollout\.episode\.tool_parser to one of hermes, qwen3_xml, "
                                          r"llama3_json, mistral"):
        parser_for(tok)


def test_parser_named():
    assert parser_named("llama3_json") is PARSERS["llama3_json"]
    with pytest.raises(ConfigError) as error:
        parser_named("json")
    assert str(error.value) == ("rollout.episode.tool_parser=json: no such tool-call parser; use one of hermes, "
                                "qwen3_xml, llama3_json, mistral (or leave it unset to follow the chat template)")


HERMES = '; expected <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call>'


def test_hermes_malformed_calls_become_one_message_each_and_good_ones_still_run():
    text = ('Thinking. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
            '<tool_call>{"name": "a", "arguments": {"x": 1</tool_call>'
            '<tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>["a"]</tool_call>'
            '<tool_call>{"name": "b", "arguments": [1, 2]}</tool_call>'
            '<tool_call>{"name": "c", "arguments": "{\\"y\\": 2}"}</tool_call>'
            '<tool_call>{"name": "d"}</tool_call> done <tool_call>{"name": "e"')
    assert PARSERS["hermes"].parse(text) == ParsedTurn(
        "Thinking.  done", [ToolCall("a", {"x": 1}), ToolCall("c", {"y": 2}), ToolCall("d", {})], [
            "error: tool call 2: not valid JSON (Expecting ',' delimiter: line 1 column 35 (char 34))" + HERMES,
            'error: tool call 3: no "name" string' + HERMES,
            "error: tool call 4: got an array instead of a JSON object" + HERMES,
            "error: tool call 5: the arguments of b must be a JSON object, got an array" + HERMES,
            "error: tool call 8: <tool_call> is not closed by </tool_call>" + HERMES])


def test_hermes_text_without_calls_is_all_content():
    assert PARSERS["hermes"].parse("  The answer is 4.\n") == ParsedTurn("The answer is 4.", [], [])


def test_llama3_json_calls_and_failures():
    parse = PARSERS["llama3_json"].parse
    expected = '; expected {"name": "<tool name>", "parameters": {...}}'
    assert parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}') == \
        ParsedTurn("", [ToolCall("a", {"x": 1}), ToolCall("b", {})], [])
    assert parse('{"name": "a", "parameters": {"x": 1}') == ParsedTurn("", [], [
        "error: tool call 1: not valid JSON (Expecting ',' delimiter: line 1 column 37 (char 36))" + expected])
    assert parse('<|python_tag|>brave_search.call(query="x")') == ParsedTurn("", [], [
        "error: tool call 1: not valid JSON (Expecting value: line 1 column 1 (char 0))" + expected])
    # an answer that merely holds JSON is an answer
    assert parse('The result is {"name": "a"}.') == ParsedTurn('The result is {"name": "a"}.', [], [])


def test_mistral_both_spellings_and_failures():
    parse = PARSERS["mistral"].parse
    expected = '; expected [TOOL_CALLS][{"name": "<tool name>", "arguments": {...}}]'
    assert parse('[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]mul[CALL_ID]abc123xyz[ARGS]{"b": 2.5}') == \
        ParsedTurn("", [ToolCall("add", {"a": 1}), ToolCall("mul", {"b": 2.5})], [])
    assert parse('Sure.[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, {"arguments": {}}]') == ParsedTurn(
        "Sure.", [ToolCall("add", {"a": 1})], ['error: tool call 2: no "name" string' + expected])
    assert parse('[TOOL_CALLS]add[ARGS]{"a": ') == ParsedTurn("", [], [
        "error: tool call 1: not valid JSON (Expecting value: line 1 column 6 (char 5))" + expected])


def test_qwen3_xml_failures():
    parse = PARSERS["qwen3_xml"].parse
    expected = "; expected <tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>"
    text = ('<tool_call>\n<function=a>\n<parameter=x>\nhello world\n</parameter>\n</function>\n</tool_call>'
            '<tool_call>{"name": "a"}</tool_call>'
            '<tool_call><function=b><parameter=x>1</parameter> stray</function></tool_call>'
            '<tool_call><function=c>')
    assert parse(text) == ParsedTurn("", [ToolCall("a", {"x": "hello world"})], [
        "error: tool call 2: no <function=NAME>...</function> block" + expected,
        "error: tool call 3: text outside <parameter=KEY>...</parameter> in b" + expected,
        "error: tool call 4: <tool_call> is not closed by </tool_call>" + expected])


def test_hermes_markers_read_the_same_as_text_or_as_special_tokens(tokenizer):
    turn = 'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>'
    expected = ParsedTurn("Adding.", [ToolCall("add", {"a": 1})], [])
    as_tokens = copy.deepcopy(tokenizer)
    as_tokens.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    for tok in (tokenizer, as_tokens):
        ids = tok(turn, add_special_tokens=False)["input_ids"]
        assert PARSERS["hermes"].parse(decode_turn(tok, ids, PARSERS["hermes"])) == expected
    assert as_tokens.convert_tokens_to_ids("<tool_call>") in as_tokens.all_special_ids
