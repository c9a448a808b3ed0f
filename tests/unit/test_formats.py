import json

import pytest

from llm_stages.data.kinds.conversation import iter_conversations
from llm_stages.data.kinds.text import read_text_documents
from llm_stages.data.sources import read_records
from llm_stages.errors import DataFormatError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: file is empty"):
        read_records(_write(tmp_path, "empty.jsonl", ""))


def test_malformed_json_line_names_the_line(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    path = _write(tmp_path, "bad.jsonl", f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataFormatError) as e:
        read_records(path)
    assert e.value.line == 3 and str(e.value).startswith(f"{path}:3: invalid JSON")


def test_record_without_needed_field_names_line_and_field(tmp_path):
    path = _write(tmp_path, "x.jsonl", json.dumps({"instruction": "a", "output": "b"}) + "\n"
                  + json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}) + "\n")
    with pytest.raises(DataFormatError) as e:
        list(iter_conversations(read_records(path)))
    assert (e.value.line, e.value.field) == (2, "conversations[1].value")


def test_unknown_keys_are_reported(tmp_path):
    path = _write(tmp_path, "x.jsonl", json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataFormatError, match=r"x\.jsonl:1: cannot tell the conversation format"):
        list(iter_conversations(read_records(path)))


def test_alpaca_with_input_and_history(tmp_path):
    rec = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "S", "history": [["q0", "a0"]]}
    path = _write(tmp_path, "a.json", json.dumps([rec]))
    [(_, (messages, _))] = list(iter_conversations(read_records(path)))
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                        {"role": "assistant", "content": "a0"}, {"role": "user", "content": "Add\n2 and 3"},
                        {"role": "assistant", "content": "5"}]


def test_text_documents_split_on_blank_lines(tmp_path):
    path = _write(tmp_path, "t.txt", "a b\nc\n\n\nd e\n\nf\n")
    assert [(r.line, r.data) for r in read_text_documents(path)] == [(1, "a b\nc"), (5, "d e"), (7, "f")]


def test_a_run_reports_bad_data_in_one_line(make_cfg, tmp_path):
    """What `python -m llm_stages stage=sft data=file data.path=bad.jsonl` prints after `error: `
    (tests/integration/test_config_checks.py runs the command itself for the exit code and the one line)."""
    from llm_stages.train import train

    path = _write(tmp_path, "bad.jsonl", json.dumps({"conversations": []}) + "\n{oops\n")
    with pytest.raises(DataFormatError) as error:
        train(make_cfg("stage=sft", "data=file", f"data.path={path}"))
    assert str(error.value).startswith(f"{path}:2: invalid JSON") and "\n" not in str(error.value)


def test_missing_file_is_a_clear_error_through_the_datamodule_cache(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from llm_stages.data.datamodule import SFTDataModule

    data = OmegaConf.create({"path": str(tmp_path / "absent.jsonl"), "val_path": "auto", "val_ratio": 0.1,
                             "format": "auto", "system_prompt": None, "demo": None, "cache_dir": str(tmp_path / "c")})
    with pytest.raises(DataFormatError, match=r"absent\.jsonl: file not found"):
        SFTDataModule(data, tokenizer, batch_size=1).setup()
