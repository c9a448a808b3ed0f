"""Every layout HF `datasets` reads loads here too, content (not the extension) deciding; what
cannot be read is one line naming the file (and line)."""

import bz2
import gzip
import json
import lzma

import pytest

from llm_stages.data.sources import read_records
from llm_stages.errors import DataFormatError

ROWS = [{"instruction": "Add 1 and 2", "output": "3"}, {"instruction": "Say hi", "output": "hi"}]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)


def _data(records):
    return [r.data for r in records]


@pytest.mark.parametrize("name", ["a.json", "a.jsonl", "a.ndjson", "a.txt.json"])
def test_json_array_or_json_lines_whatever_the_extension(tmp_path, name):
    lines, array = tmp_path / f"lines-{name}", tmp_path / f"array-{name}"
    lines.write_text(JSONL)
    array.write_text(json.dumps(ROWS, indent=2))
    assert _data(read_records(lines)) == _data(read_records(array)) == ROWS
    assert [r.line for r in read_records(lines)] == [1, 2]


def test_lines_that_are_bare_message_lists_and_a_single_line(tmp_path):
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(conversation) + "\n" + json.dumps(conversation) + "\n")
    assert _data(read_records(path)) == [conversation, conversation]
    path.write_text(json.dumps(conversation) + "\n")  # one line: one conversation, not two records
    assert _data(read_records(path)) == [conversation]
    path.write_text(json.dumps(ROWS[0]) + "\n")
    assert _data(read_records(path)) == [ROWS[0]]


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress), (".json.xz", lzma.compress),
    (".jsonl.zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
    (".jsonl", gzip.compress),  # gzip bytes under a plain name: the first bytes decide
])
def test_compressed_files(tmp_path, suffix, compress):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(compress(JSONL.encode()))
    assert _data(read_records(path)) == ROWS


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_bom_marked_encodings(tmp_path, encoding):
    path = tmp_path / "a.jsonl"
    text = JSONL.replace("hi", "héllo 你好")
    raw = text.encode(encoding)
    if encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw
    path.write_bytes(raw)
    assert read_records(path)[1].data["output"] == "héllo 你好"


def test_other_encodings_and_binary_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(JSONL.replace("hi", "héllo").encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin\.jsonl:2: is not UTF-8 text \(byte 0xe9 at offset \d+\); re-save"):
        read_records(latin)
    binary = tmp_path / "model.bin.json"
    binary.write_bytes(b"\x00\x01\x02\xff\xfe\x00" * 100)
    with pytest.raises(DataFormatError, match=r"model\.bin\.json:1: is binary"):
        read_records(binary)


def test_csv_and_tsv_cells_are_text_and_name_their_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"What is 40 + 2?",42\n"A cell\nover two lines",b\n', encoding="utf-8")
    records = read_records(path)
    assert _data(records) == [{"instruction": "What is 40 + 2?", "output": "42"},
                              {"instruction": "A cell\nover two lines", "output": "b"}]
    assert [r.line for r in records] == [2, 3]
    tsv = tmp_path / "a.tsv"
    tsv.write_text("prompt\tchosen\trejected\nq\t1\t2\n")
    assert _data(read_records(tsv)) == [{"prompt": "q", "chosen": "1", "rejected": "2"}]


def test_parquet_arrow_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert _data(read_records(tmp_path / "a.parquet")) == ROWS
    assert _data(read_records(tmp_path / "saved")) == ROWS
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    assert _data(read_records(arrow)) == ROWS
    assert _data(read_records(tmp_path / "saved_dict", split="test")) == ROWS[:1]
    with pytest.raises(DataFormatError, match=r"no split 'validation' \(splits: \['test', 'train'\]\); set data.split"):
        read_records(tmp_path / "saved_dict", split="validation")


def test_folder_of_shards_split_by_name(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00002.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "data" / "train-00001-of-00002.jsonl.gz").write_bytes(gzip.compress(json.dumps(ROWS[1]).encode()))
    (tmp_path / "data" / "test.json").write_text(json.dumps([{"instruction": "t", "output": "u"}]))
    assert _data(read_records(tmp_path / "data")) == ROWS
    assert _data(read_records(tmp_path / "data", split="test")) == [{"instruction": "t", "output": "u"}]
    unsplit = tmp_path / "shards"
    unsplit.mkdir()
    for i, row in enumerate(ROWS):
        (unsplit / f"part-{i}.jsonl").write_text(json.dumps(row) + "\n")
    assert _data(read_records(unsplit)) == ROWS


def test_dataset_repository_folder_through_load_dataset(tmp_path):
    repo = tmp_path / "gsm8k"
    (repo / "main").mkdir(parents=True)
    (repo / "main" / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: main/train.jsonl\n---\n# a dataset\n")
    assert _data(read_records(repo, subset="main")) == [{"question": "1+1?", "answer": "#### 2"}]


def test_a_dataset_name_that_is_not_cached_is_one_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline as HF_HUB_OFFLINE=1 makes it (read at import, so set on the loaded modules too): no
    # network attempts and retries in a test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataFormatError) as e:
        read_records("someone/no-such-dataset")
    assert "someone/no-such-dataset[train]" in str(e.value) and "\n" not in str(e.value)
    assert "not in the local cache" in str(e.value) and "huggingface-cli download --repo-type dataset" in str(e.value)


def test_a_json_object_holding_the_records_needs_data_field(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "1", "data": ROWS}))
    with pytest.raises(DataFormatError, match=r"list of records under 'data'; set data.field=data"):
        read_records(path)
    assert _data(read_records(path, field="data")) == ROWS


def test_malformed_lines_can_be_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("{broken\n" + JSONL + "[1, \n")
    with pytest.raises(DataFormatError, match=r"a\.jsonl:1: invalid JSON"):
        read_records(path)
    bad = []
    assert _data(read_records(path, on_bad_line=bad.append)) == ROWS
    assert [e.line for e in bad] == [1, 4]
    array = tmp_path / "b.json"
    array.write_text('[\n {"a": 1},\n {"a": 2\n]\n')
    with pytest.raises(DataFormatError, match=r"b\.json:4: invalid JSON"):
        read_records(array)
