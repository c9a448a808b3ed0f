"""Tool schemas on a template that cannot show them become a system turn put first; the trained
replies must still be the assistant's, not the turn before each (the indices shift by that turn)."""

from __future__ import annotations

from llm_stages.data.render import IGNORE_INDEX, render_conversation

SCHEMA = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {}}}}


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_schema_turn_does_not_shift_the_trained_replies(tokenizer):
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
    messages = [{"role": "user", "content": "What is 12 * 34?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "408"},
                {"role": "assistant", "content": "408"}]
    example = render_conversation(tokenizer, messages, tools=[SCHEMA])
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou can call these tools:\n{")
    assert trained_text(tokenizer, example) == (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call><|im_end|>\n'
        "408<|im_end|>\n")


def test_schema_joins_an_existing_system_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    example = render_conversation(tokenizer, messages, tools=[SCHEMA])
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools:")
    assert trained_text(tokenizer, example) == "Hello<|im_end|>\n"
