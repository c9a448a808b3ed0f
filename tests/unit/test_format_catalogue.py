"""Every record format reads to the same conversation / pair / prompt, and renders with exact masks."""

import json

import pytest

from llm_stages.data.kinds.conversation import iter_conversations
from llm_stages.data.kinds.pair import iter_pairs
from llm_stages.data.kinds.prompt import prompt_record, reference_answer
from llm_stages.data.sources import Record, read_records
from llm_stages.data.render import IGNORE_INDEX, render_conversation
from llm_stages.errors import DataFormatError

MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"},
              {"role": "assistant", "content": "6"}]

CONVERSATIONS = {
    "sharegpt": {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"},
        {"from": "human", "value": "and 3 + 3?"}, {"from": "gpt", "value": "6"}]},
    "sharegpt_user_assistant": {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "user", "value": "2 + 2?"},
        {"from": "assistant", "value": "4"}, {"from": "user", "value": "and 3 + 3?"}, {"from": "assistant", "value": "6"}]},
    "openai_messages": {"messages": MULTI_TURN},
    "colossal_messages": {"messages": [
        {"from": "system", "content": "Be brief."}, {"from": "human", "content": "2 + 2?"},
        {"from": "assistant", "content": "4"}, {"from": "user", "content": "and 3 + 3?"},
        {"from": "assistant", "content": "6"}]},
    "alpaca_history": {"system": "Be brief.", "history": [["2 + 2?", "4"]], "instruction": "and 3 + 3?", "output": "6"},
}


def _records(tmp_path, *rows):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(path)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversation_formats_render_exact_text_and_masks(name, tmp_path, tokenizer):
    [(_, (messages, tools))] = list(iter_conversations(_records(tmp_path, CONVERSATIONS[name])))
    assert messages == MULTI_TURN and tools is None
    example = render_conversation(tokenizer, messages)
    assert tokenizer.decode(example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
        "4<|im_end|>\n<|im_start|>user\nand 3 + 3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n")
    trained = [tokenizer.decode([t]) for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert "".join(trained) == "4<|im_end|>\n6<|im_end|>\n"


def test_colossal_single_turn_and_tool_turns(tmp_path):
    [(_, (single, _))] = list(iter_conversations(_records(tmp_path, {"source": "Q", "target": "A", "category": "x"})))
    assert single == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    tools = {"conversations": [{"from": "human", "value": "weather?"},
                               {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {\"x\": 1}}"},
                               {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
             "tools": "[]"}
    [(_, (messages, schemas))] = list(iter_conversations(_records(tmp_path, tools)))
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] and schemas is None
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]


PAIR = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "2 + 2?"}], "4", "5")
PAIRS = {
    "sharegpt_pair": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                        {"from": "human", "value": "2 + 2?"}], "chosen": "4", "rejected": "5"},
    "prompt_messages": {"prompt": PAIR[0], "chosen": [{"role": "assistant", "content": "4"}],
                        "rejected": [{"role": "assistant", "content": "5"}]},
    "colossal_pair": {"context": [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "hello"},
                                  {"from": "human", "content": "2 + 2?"}],
                      "chosen": [{"from": "assistant", "content": "4"}], "rejected": [{"from": "assistant", "content": "5"}]},
    "implicit_prompt": {"chosen": PAIR[0] + [{"role": "assistant", "content": "4"}],
                        "rejected": PAIR[0] + [{"role": "assistant", "content": "5"}]},
    "hh_rlhf": {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2 + 2?\n\nAssistant: 4",
                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2 + 2?\n\nAssistant: 5"},
    "medicalgpt_original": {"system": "", "history": [["hi", "hello"]], "question": "2 + 2?",
                            "response_chosen": "4", "response_rejected": "5"},
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_multi_turn_pair_formats_read_to_the_same_pair(name, tmp_path):
    [(_, pair)] = list(iter_pairs(_records(tmp_path, PAIRS[name])))
    assert (pair.prompt, pair.chosen["content"], pair.rejected["content"]) == PAIR


@pytest.mark.parametrize("record,field,message", [
    ({"prompt": "q", "completion": "a", "label": True}, None, "unpaired feedback .* is read by the KTO stage"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "missing"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}, "rejected", "share no turn"),
])
def test_bad_pairs_name_line_and_field(record, field, message, tmp_path):
    with pytest.raises(DataFormatError, match=message) as e:
        list(iter_pairs(_records(tmp_path, {"prompt": "ok", "chosen": "a", "rejected": "b"}, record)))
    assert e.value.line == 2 and e.value.field == field


def test_rl_prompt_formats_and_gsm8k_answers():
    rec = lambda data: Record("p.jsonl", 1, data)  # noqa: E731
    q = prompt_record(rec({"question": "What is 6 * 7?", "answer": "6 * 7 = 42.\n#### 42", "level": 1}))
    assert q.messages == [{"role": "user", "content": "What is 6 * 7?"}] and q.answer == "42" and q.fields["level"] == 1
    assert prompt_record(rec({"prompt": "Say hi"})).answer is None
    m = prompt_record(rec({"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}))
    assert m.messages == [{"role": "user", "content": "2+2"}] and m.answer == "4"
    assert reference_answer("so #### 1,234") == "1234" and reference_answer(7) == "7"
    with pytest.raises(DataFormatError, match="cannot tell the prompt format"):
        prompt_record(rec({"text": "x"}))


def test_parquet_and_csv_tables_read_through_datasets(tmp_path):
    import datasets

    rows = [{"instruction": "Add 1 and 2", "input": "", "output": "3"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    for name in ("a.parquet", "a.csv"):
        records = read_records(tmp_path / name)
        assert [r.line for r in records] == ([1, 2] if name.endswith("parquet") else [2, 3])  # CSV: the file's line
        assert [c.messages[-1]["content"] for _, c in iter_conversations(records)] == ["3", "hi"]


def test_unknown_explicit_format_is_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"unknown conversation format 'vicuna' \(data.format\); known: \['alpaca'"):
        list(iter_conversations(_records(tmp_path, {"instruction": "a", "output": "b"}), "vicuna"))
