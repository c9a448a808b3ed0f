import json

import pytest
from omegaconf import OmegaConf

from llm_stages.data.datamodule import PTDataModule, SFTDataModule
from llm_stages.data.render import num_trained_tokens


def _data(path, **kw):
    return OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None, **kw})


def test_sft_drops_and_counts_records_with_nothing_to_train(tmp_path, tokenizer):
    records = [
        {"conversations": [{"from": "human", "value": "only a question"}]},  # no assistant turn
        {"conversations": [{"from": "human", "value": "x " * 200}, {"from": "gpt", "value": "cut away"}]},  # too long
        {"conversations": [{"from": "human", "value": "1 + 1?"}, {"from": "gpt", "value": "2"}]},
        {"instruction": "Say hi", "output": "hi"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = SFTDataModule(_data(path), tokenizer, batch_size=1, max_length=64)
    dm.setup()
    assert len(dm.train_set) == 2
    assert dm.stats == {"train_dropped_no_assistant_turn": 1, "train_truncated": 1, "train_dropped_no_trained_tokens": 1}
    assert all(num_trained_tokens(e.labels) > 0 and len(e.input_ids) <= 64 for e in dm.train_set)


def test_system_prompt_override_replaces_the_records_system_turn(tmp_path, tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "system", "value": "old"}, {"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "a"}]}) + "\n")
    dm = SFTDataModule(_data(path, system_prompt="NEW"), tokenizer, batch_size=1)
    dm.setup()
    text = tokenizer.decode(dm.train_set[0].input_ids)
    assert "NEW" in text and "old" not in text


def test_pt_blocks_and_val_split_from_sibling_file(tmp_path, tokenizer):
    (tmp_path / "c_train.txt").write_text("\n\n".join(f"document number {i} has some words" for i in range(50)))
    (tmp_path / "c_val.txt").write_text("\n\n".join(f"held out text {i}" for i in range(20)))
    dm = PTDataModule(_data(tmp_path / "c_train.txt", val_path="auto"), tokenizer, batch_size=2, block_size=16)
    dm.setup()
    assert dm.train_set and dm.val_set
    assert all(len(e.input_ids) == 16 for e in dm.train_set + dm.val_set)
    assert "held out" in tokenizer.decode(dm.val_set[0].input_ids)


def test_three_source_weighted_mix_is_within_five_percent_and_deterministic(tmp_path, tokenizer):
    sources = []
    for name, n in (("a", 300), ("b", 100), ("c", 40)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"{name} {i}", "output": name}) + "\n" for i in range(n)))
        sources.append({"path": str(path), "weight": {"a": 0.5, "b": 0.3, "c": 0.2}[name]})
    data = _data(tmp_path / "a.jsonl", sources=sources, mix_size=2000)
    dm = SFTDataModule(data, tokenizer, batch_size=1, max_length=64)
    dm.setup()
    assert len(dm.train_set) == 2000
    answers = [tokenizer.decode([t for t, label in zip(e.input_ids, e.labels) if label != -100]) for e in dm.train_set]
    for name, weight in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        share = sum(a.startswith(name) for a in answers) / 2000
        assert abs(share - weight) <= 0.05
    assert dm.stats["source:c.jsonl"] == 400  # 40 examples cycled 10 times
    again = SFTDataModule(data, tokenizer, batch_size=1, max_length=64)
    again.setup()
    assert [e.input_ids for e in again.train_set] == [e.input_ids for e in dm.train_set]


def test_on_bad_record_skip_counts_and_error_names_the_record(tmp_path, tokenizer):
    from llm_stages.errors import DataFormatError

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "completion": "a", "label": True}, {"prompt": "r", "chosen": "c", "rejected": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from llm_stages.data.datamodule import PairDataModule

    with pytest.raises(DataFormatError, match="unpaired feedback") as e:
        PairDataModule(_data(path), tokenizer, batch_size=1).setup()
    assert e.value.line == 3  # the identical pair on line 2 is skipped, not an error
    dm = PairDataModule(_data(path, on_bad_record="skip"), tokenizer, batch_size=1)
    dm.setup()
    assert len(dm.train_set) == 2
    assert dm.stats == {"train_dropped_identical_pair": 1, "train_skipped_bad_record": 1}


def test_group_by_length_cuts_padding_and_keeps_every_example_once():
    from llm_stages.data.collate import ResumableBatchSampler

    lengths = [(i * 37) % 200 + 1 for i in range(1000)]
    plain = ResumableBatchSampler(1000, 10, seed=0).batches(0)
    grouped = ResumableBatchSampler(1000, 10, seed=0, lengths=lengths).batches(0)
    padding = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert padding(grouped) < 0.2 * padding(plain)
    assert grouped != ResumableBatchSampler(1000, 10, seed=0, lengths=lengths).batches(1)  # reshuffled per epoch


def test_tokenization_cache_is_reused_and_keyed_by_settings(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i} " * (i % 7 + 1), "output": "a"}) + "\n" for i in range(30)))
    data = _data(path, cache_dir=str(tmp_path / "cache"))
    first = SFTDataModule(data, tokenizer, batch_size=1, max_length=12)
    first.setup()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1 and first.stats.get("train_truncated")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(SFTDataModule, "build_examples", no_tokenizing)
    second = SFTDataModule(data, tokenizer, batch_size=1, max_length=12)
    second.setup()
    assert second.train_set == first.train_set and second.stats == first.stats
    monkeypatch.undo()
    third = SFTDataModule(data, tokenizer, batch_size=1, max_length=64)  # another max_length: another entry
    third.setup()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_pair_examples_survive_the_cache(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PairDataModule

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b", "margin": i}) + "\n"
                            for i in range(4)))
    data = _data(path, cache_dir=str(tmp_path / "cache"))
    a, b = PairDataModule(data, tokenizer, batch_size=1), PairDataModule(data, tokenizer, batch_size=1)
    a.setup()
    b.setup()
    assert a.train_set == b.train_set and [p.margin for p in b.train_set] == [0.0, 1.0, 2.0, 3.0]


def test_rl_prompts_are_left_padded_and_bad_records_named(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PromptDataModule
    from llm_stages.errors import ConfigError, DataFormatError

    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "a much longer question about 12 + 30", "answer": "42"}) + "\n")
    dm = PromptDataModule(_data(path), tokenizer, batch_size=2)
    dm.setup()
    batch = dm.collate_one(dm.train_set)
    lengths = [len(e.input_ids) for e in dm.train_set]
    assert batch.input_ids.shape == (2, max(lengths)) and batch.answers == ["2", "42"]
    short = lengths.index(min(lengths))
    pad = max(lengths) - min(lengths)
    assert batch.attention_mask[short].tolist() == [0] * pad + [1] * min(lengths)  # padded on the left
    assert batch.input_ids[short, pad:].tolist() == dm.train_set[short].input_ids
    assert batch.prompts[0] == "1 + 1?"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "ok?"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2.*cannot tell the prompt format.*data.columns='\{prompt: text\}'"):
        PromptDataModule(_data(bad), tokenizer, batch_size=1).setup()
    with pytest.raises(ConfigError, match="grad_accum"):
        PromptDataModule(_data(path), tokenizer, batch_size=1, grad_accum=2)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_global_batch_is_the_same_examples_at_any_world_size(grouped):
    """Step k of 2 ranks x 4 (or 4 ranks x 2) trains on exactly the examples of step k of 1 process x 8."""
    from llm_stages.data.collate import ResumableBatchSampler

    lengths = [(i * 37) % 200 + 1 for i in range(1003)] if grouped else None
    single = ResumableBatchSampler(1003, 8, seed=3, lengths=lengths).batches(0)
    for world in (2, 4):
        ranks = [ResumableBatchSampler(1003, 8 // world, seed=3, rank=r, world_size=world, lengths=lengths).batches(0)
                 for r in range(world)]
        assert all(len(batches) == len(single) == 1003 // 8 for batches in ranks)
        assert [sorted(sum((ranks[r][k] for r in range(world)), [])) for k in range(len(single))] == \
            [sorted(batch) for batch in single]


def test_length_groups_minimise_padded_tokens_plus_a_cost_per_group():
    from llm_stages.data.collate import length_groups

    lengths = [10, 100, 12, 95, 50, 11]
    # Free passes: every distinct length band its own group (4 at most), nothing padded beyond 12.
    assert length_groups(lengths, 4, 0) == [[1], [3], [4], [0, 2, 5]]
    # 64 tokens a pass: {100, 95, 50} + {12, 11, 10} = 3*100 + 3*12 + 2*64 = 464 beats 3 groups (478) and 1 (664).
    assert length_groups(lengths, 4, 64) == [[1, 3, 4], [0, 2, 5]]
    assert length_groups(lengths, 1, 0) == [[0, 1, 2, 3, 4, 5]]
    assert length_groups([30] * 8, 4, 1) == [list(range(8))]  # equal lengths: splitting saves nothing


def test_micro_batches_split_by_length_keep_every_example_once(tokenizer):
    from llm_stages.data.collate import MicroBatches, collate_causal
    from llm_stages.data.render import Example

    examples = [Example(list(range(1, n + 1)), [-100] + list(range(2, n + 1))) for n in [5, 40, 6, 38, 7, 39, 5, 41]]
    split = MicroBatches(lambda ex: collate_causal(ex, 0), 4, length=lambda e: len(e.input_ids), max_groups=4,
                         group_cost=4)(examples)
    plain = MicroBatches(lambda ex: collate_causal(ex, 0), 4)(examples)
    assert [b.input_ids.shape for b in plain] == [(4, 40), (4, 41)]
    assert [b.input_ids.shape for b in split] == [(2, 40), (2, 6), (2, 41), (2, 7)]
    assert sum(int(b.attention_mask.sum()) for b in split) == sum(int(b.attention_mask.sum()) for b in plain)


def test_length_groups_only_split_in_single_process_training(tokenizer, tmp_path):
    from types import SimpleNamespace

    from llm_stages.errors import ConfigError

    dm = SFTDataModule(_data(tmp_path / "x.jsonl"), tokenizer, batch_size=8, length_groups=4)
    assert dm._length_groups(None) == 4 and dm._length_groups(SimpleNamespace(world_size=1)) == 4
    # Several processes: each rank would split its slice differently, and each pass is a collective.
    assert dm._length_groups(SimpleNamespace(world_size=2)) == 1
    with pytest.raises(ConfigError, match="length_groups"):
        SFTDataModule(_data(tmp_path / "x.jsonl"), tokenizer, length_groups=0)
