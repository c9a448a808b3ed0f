"""Record shapes real files have: column mapping, message shapes, tool use, reference answers in worked
solutions, unclean preference data, unpaired feedback — and one clear line for what cannot work."""

import json

import pytest
from omegaconf import OmegaConf

from llm_stages.data.kinds.conversation import read_conversation
from llm_stages.data.kinds.pair import read_pair
from llm_stages.data.kinds.prompt import prompt_record, reference_answer
from llm_stages.data.kinds.unpaired import read_unpaired
from llm_stages.data.sources import Record
from llm_stages.data.render import IGNORE_INDEX
from llm_stages.errors import ConfigError, DataFormatError


def rec(data, line=1):
    return Record("f.jsonl", line, data)


def _data(path, **extra):
    return OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None, **extra})


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


# -- column mapping -------------------------------------------------------------------------------

def test_math_style_records_by_detection_and_by_columns():
    math = {"problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?", "solution": "It is $\\boxed{1}$.", "answer": "1",
            "level": "Level 1"}
    auto = prompt_record(rec(math))
    assert auto.messages == [{"role": "user", "content": math["problem"]}] and auto.answer == "1"
    mapped = prompt_record(rec(math), columns={"prompt": "problem", "answer": "solution"})
    assert mapped.answer == "1" and mapped.fields["level"] == "Level 1"  # the boxed final answer of the solution
    assert reference_answer("so the area is $\\boxed{\\frac{3}{4}}$ square units") == "\\frac{3}{4}"
    assert reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"


def test_unknown_layout_error_lists_keys_and_the_override_that_works():
    with pytest.raises(DataFormatError) as e:
        read_pair(rec({"query": "q", "chosen_messages": [], "rejected_messages": []}, line=7))
    assert "f.jsonl:7: cannot tell the preference format from keys ['chosen_messages', 'query', 'rejected_messages']" in str(e.value)
    assert "data.columns='{chosen: chosen_messages, rejected: rejected_messages}'" in str(e.value)
    with pytest.raises(DataFormatError, match=r"data.columns='\{prompt: problem_statement\}'"):
        prompt_record(rec({"problem_id": 3, "sol": "4", "problem_statement": "2+2"}))


def test_two_conversations_under_other_names_via_columns():
    conversation = [{"role": "user", "content": "2+2?"}]
    record = rec({"chosen_messages": conversation + [{"role": "assistant", "content": "4"}],
                  "rejected_messages": conversation + [{"role": "assistant", "content": "5"}]})
    pair = read_pair(record, columns={"chosen": "chosen_messages", "rejected": "rejected_messages"})
    assert pair.prompt == conversation and (pair.chosen["content"], pair.rejected["content"]) == ("4", "5")


def test_ultrafeedback_binarized_replies_that_repeat_the_prompt():
    prompt = [{"role": "user", "content": "2+2?"}]
    pair = read_pair(rec({"prompt": "2+2?", "chosen": prompt + [{"role": "assistant", "content": "4"}],
                          "rejected": prompt + [{"role": "assistant", "content": "5"}], "score_chosen": 9.0}))
    assert pair.prompt == prompt and (pair.chosen["content"], pair.rejected["content"]) == ("4", "5")


def test_columns_name_missing_fields_and_unknown_roles(tmp_path, tokenizer):
    with pytest.raises(DataFormatError, match=r"f.jsonl:1: data.columns.messages=dialog: no such field \(record keys: \['turns'\]\)"):
        read_conversation(rec({"turns": []}), columns={"messages": "dialog"})
    from llm_stages.data.datamodule import SFTDataModule

    path = _write(tmp_path, [{"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ConfigError, match=r"data.columns: unknown role\(s\) \['dialogue'\]; the roles are"):
        SFTDataModule(_data(path, columns={"dialogue": "dialog"}), tokenizer, batch_size=1).setup()
    dm = SFTDataModule(_data(path, columns={"messages": "dialog"}), tokenizer, batch_size=1)
    dm.setup()
    assert _trained(tokenizer, dm.train_set[0]) == "a<|im_end|>\n"


def test_text_and_system_columns(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PTDataModule

    path = _write(tmp_path, [{"content": "one two three " * 20}, {"content": "four five " * 30}])
    dm = PTDataModule(_data(path, columns={"text": "content"}), tokenizer, batch_size=1, block_size=16)
    dm.setup()
    assert len(dm.train_set) > 4
    messages, _ = read_conversation(rec({"sys": "Be brief.", "instruction": "q", "output": "a"}), columns={"system": "sys"})
    assert messages[0] == {"role": "system", "content": "Be brief."}


# -- message shapes -------------------------------------------------------------------------------

def test_content_parts_single_message_object_and_bare_lists():
    parts = rec({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "value": "there"}]},
                              {"role": "assistant", "content": [{"type": "thinking", "thinking": "greet"},
                                                                {"type": "text", "text": "Hi!"}]}]})
    messages, _ = read_conversation(parts)
    assert messages == [{"role": "user", "content": "Hello\nthere"},
                        {"role": "assistant", "content": "Hi!", "reasoning_content": "greet"}]
    single = prompt_record(rec({"messages": {"role": "user", "content": "2+2?"}, "gt_answer": "4"}))
    assert single.messages == [{"role": "user", "content": "2+2?"}] and single.answer == "4"
    bare = read_conversation(rec([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]))
    assert bare.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataFormatError, match=r"field 'messages\[0\].content\[1\]': a 'image_url' part: the stages train text-only"):
        read_conversation(rec({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                         {"type": "image_url", "image_url": "u"}]}]}))


def test_per_message_loss_weight_and_numeric_replies(tmp_path, tokenizer):
    from llm_stages.data.datamodule import SFTDataModule

    rows = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "3", "loss_weight": 0.0},
                          {"role": "user", "content": "no, again"}, {"role": "assistant", "content": 2, "loss_weight": 1}]},
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y", "train": False}]}]
    dm = SFTDataModule(_data(_write(tmp_path, rows), on_bad_record="skip"), tokenizer, batch_size=1)
    dm.setup()
    assert [_trained(tokenizer, e) for e in dm.train_set] == ["2<|im_end|>\n"]
    assert dm.stats == {"train_dropped_no_assistant_turn": 1}  # nothing left to train: counted, not silent


def test_tool_use_sft_shows_the_tools_and_trains_the_calls(tmp_path, tokenizer):
    from pathlib import Path

    import trl

    from llm_stages.data.datamodule import SFTDataModule

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    rows = [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                               {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
             "tools": json.dumps(tools)},
            {"messages": [{"role": "user", "content": "Weather in Rome?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "rain"}, {"role": "assistant", "content": "Rain."}],
             "tools": tools}]
    dm = SFTDataModule(_data(_write(tmp_path, rows)), tokenizer, batch_size=1)
    dm.setup()
    for example, city, answer, output in zip(dm.train_set, ("Paris", "Rome"), ("Sunny.", "Rain."), ("sunny", "rain")):
        text = tokenizer.decode(example.input_ids)
        assert '<tools>\n{"name": "get_weather", "description": "Weather of a city"' in text  # the schema, in the system turn
        assert _trained(tokenizer, example) == (f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}'
                                                f"\n</tool_call><|im_end|>\n{answer}<|im_end|>\n")
        assert f"<tool_response>\n{output}\n</tool_response>" in text


# -- preference data as it comes ------------------------------------------------------------------

HH = "\n\nHuman: {q}\n\nAssistant: {a}"


def test_hh_rlhf_empty_replies_are_valid_and_identical_pairs_skipped(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PairDataModule

    rows = [{"chosen": HH.format(q="hi", a="hello"), "rejected": HH.format(q="hi", a="go away")},
            {"chosen": HH.format(q="hi", a="hello"), "rejected": HH.format(q="hi", a="")},  # an empty reply
            {"chosen": HH.format(q="x", a="same"), "rejected": HH.format(q="x", a="same")},
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": HH.format(q="q", a="no")}]
    dm = PairDataModule(_data(_write(tmp_path, rows)), tokenizer, batch_size=1)
    dm.setup()
    assert len(dm.train_set) == 3 and dm.stats == {"train_dropped_identical_pair": 1}
    assert _trained(tokenizer, dm.train_set[1].rejected) == "<|im_end|>\n"  # only the end of the turn is scored
    assert _trained(tokenizer, dm.train_set[2].chosen) == "<|im_end|>\n"


def test_hh_rlhf_transcripts_that_diverge_before_the_final_turn():
    """harmless-base/test has 5 such records (a turn written without its blank line before 'Human:')."""
    shared = "\n\nHuman: Are drag queens men?\n\nAssistant: No.\n\nHuman: Isn't that drag kings?\n\nAssistant: "
    pair = read_pair(rec({"chosen": shared + "No, men who...  Human: Then how?\n\nAssistant:  I think",
                          "rejected": shared + "A drag king is the opposite."}))
    assert [m["content"] for m in pair.prompt] == ["Are drag queens men?", "No.", "Isn't that drag kings?"]
    assert pair.chosen["content"] == "No, men who...  Human: Then how?\n\nAssistant:  I think"
    assert pair.rejected["content"] == "A drag king is the opposite."


def test_a_prompt_budget_that_leaves_no_room_for_replies_is_refused_before_reading(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PairDataModule

    with pytest.raises(ConfigError, match=r"max_prompt_length=256 leaves no room for the replies within "
                                          r"datamodule.max_length=256; .* datamodule.max_prompt_length=128"):
        PairDataModule(_data(tmp_path / "never-read.jsonl"), tokenizer, batch_size=1, max_length=256)


# -- unpaired feedback ----------------------------------------------------------------------------

def test_unpaired_feedback_reads_and_pairwise_stages_say_which_stage_reads_it(tmp_path, tokenizer):
    a = read_unpaired(rec({"prompt": "2+2?", "completion": "4", "label": True}))
    b = read_unpaired(rec({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
                           "label": "false"}))
    assert (a.prompt, a.completion["content"], a.label) == ([{"role": "user", "content": "2+2?"}], "4", True)
    assert (b.prompt, b.completion["content"], b.label) == (a.prompt, "5", False)
    with pytest.raises(DataFormatError, match=r"field 'label': expected true/false"):
        read_unpaired(rec({"prompt": "q", "completion": "a", "label": "maybe"}))
    from llm_stages.data.datamodule import PairDataModule, SFTDataModule

    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 1}])
    for module in (PairDataModule, SFTDataModule):
        with pytest.raises(DataFormatError, match=r"d.jsonl:1: unpaired feedback .* is read by the KTO stage"):
            module(_data(path), tokenizer, batch_size=1).setup()


# -- bad records: skip covers every record-level problem ----------------------------------------

def test_skip_covers_malformed_lines_in_every_stage(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PairDataModule, PromptDataModule, PTDataModule, SFTDataModule

    cases = [(SFTDataModule, {"instruction": "q", "output": "a"}, {}),
             (PairDataModule, {"prompt": "q", "chosen": "a", "rejected": "b"}, {}),
             (PromptDataModule, {"question": "q", "answer": "1"}, {}),
             (PTDataModule, {"text": "some words " * 40}, {"block_size": 8})]
    for module, good, kwargs in cases:
        path = tmp_path / f"{module.__name__}.jsonl"
        path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps([1, 2]) + "\n" + json.dumps(good) + "\n")
        with pytest.raises(DataFormatError, match=r":2: invalid JSON"):
            module(_data(path), tokenizer, batch_size=1, **kwargs).setup()
        dm = module(_data(path, on_bad_record="skip"), tokenizer, batch_size=1, **kwargs)
        dm.setup()
        assert dm.stats.get("train_skipped_bad_record") == 2, module.__name__


def test_folders_of_text_and_a_validation_split(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PTDataModule, SFTDataModule

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document " * 30 + "\n\nsecond document " * 30)
    (corpus / "b.txt.gz").write_bytes(__import__("gzip").compress(("third document " * 30).encode()))
    dm = PTDataModule(_data(corpus), tokenizer, batch_size=1, block_size=16)
    dm.setup()
    assert len(dm.train_set) >= 10
    repo = tmp_path / "repo"
    repo.mkdir()
    row = {"instruction": "q", "output": "a"}
    (repo / "train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    (repo / "test.jsonl").write_text(json.dumps({"instruction": "t", "output": "u"}) + "\n")
    dm = SFTDataModule(_data(repo, val_split="test", cache_dir=str(tmp_path / "cache")), tokenizer, batch_size=1)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (4, 1) and _trained(tokenizer, dm.val_set[0]) == "u<|im_end|>\n"
