import json

import pytest

from llm_stages.data.kinds.pair import iter_pairs, render_pair, truncate_pair
from llm_stages.data.render import IGNORE_INDEX
from llm_stages.data.sources import Record, read_records
from llm_stages.errors import DataFormatError

FORMATS = [
    ({"conversations": [{"from": "human", "value": "Q?"}], "chosen": "good", "rejected": "bad"}, "sharegpt_pair"),
    ({"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "good"},
      "rejected": {"from": "gpt", "value": "bad"}}, "sharegpt_pair"),  # LLaMA-Factory
    ({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "prompt_pair"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
      "rejected": [{"role": "assistant", "content": "bad"}]}, "prompt_pair"),
    ({"question": "Q?", "response_chosen": "good", "response_rejected": "bad", "history": [], "system": ""},
     "medicalgpt_original"),
]


@pytest.mark.parametrize("record,name", FORMATS)
def test_every_pair_format_reads_to_the_same_pair(tmp_path, record, name):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [(_, pair)] = list(iter_pairs(read_records(path)))
    assert pair.prompt == [{"role": "user", "content": "Q?"}]
    assert (pair.chosen, pair.rejected) == ({"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"})


def test_pair_without_rejected_names_the_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": None}) + "\n")
    with pytest.raises(DataFormatError) as e:
        list(iter_pairs(read_records(path)))
    assert (e.value.line, e.value.field) == (1, "rejected")


def test_pair_labels_cover_only_the_final_reply(tokenizer):
    prompt = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "earlier reply"},
              {"role": "user", "content": "2 + 2?"}]
    pair = render_pair(tokenizer, prompt, "2 + 2 = 4", "2 + 2 = 5")
    for example, reply in ((pair.chosen, "2 + 2 = 4"), (pair.rejected, "2 + 2 = 5")):
        trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == reply + tokenizer.eos_token + "\n"
    first = next(i for i, label in enumerate(pair.chosen.labels) if label != IGNORE_INDEX)
    assert pair.chosen.input_ids[:first] == pair.rejected.input_ids[:first]  # the prompt is shared


def test_pair_truncation_cuts_prompt_from_the_left_and_replies_from_the_right(tokenizer):
    pair = render_pair(tokenizer, [{"role": "user", "content": "BEGIN " + "word " * 60 + "END"}], "a " * 40, "b")
    cut, truncated = truncate_pair(pair, max_length=48, max_prompt_length=16)
    assert truncated
    assert len(cut.chosen.input_ids) == 48 and len(cut.rejected.input_ids) <= 48
    first = next(i for i, label in enumerate(cut.chosen.labels) if label != IGNORE_INDEX)
    assert first == 16  # the last 16 prompt tokens are kept
    assert "END" in tokenizer.decode(cut.chosen.input_ids[:first]) and "BEGIN" not in tokenizer.decode(cut.chosen.input_ids)


def test_per_pair_margin_is_read_and_checked(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from llm_stages.data.datamodule import PairDataModule
    from llm_stages.data.kinds.pair import collate_pairs

    path = tmp_path / "m.jsonl"
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 1.5}, {"prompt": "Q", "chosen": "a", "rejected": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None})
    dm = PairDataModule(data, tokenizer, batch_size=1)
    dm.setup()
    batch = collate_pairs(dm.train_set, tokenizer.pad_token_id)
    assert batch.margin.tolist() == [1.5, 0.0] and batch.index.tolist() == [0, 1]
    assert batch.input_ids.shape[0] == 4  # chosen rows, then rejected rows
    path.write_text(json.dumps({**rows[0], "margin": "big"}) + "\n")
    with pytest.raises(DataFormatError) as e:
        PairDataModule(data, tokenizer, batch_size=1).setup()
    assert (e.value.line, e.value.field) == (1, "margin")
