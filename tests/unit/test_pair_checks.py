"""Preference pairs checked at load: identical replies dropped with one warning line (count and the first
record's place), and a NaN/inf `margin` a bad record (an error naming file:line and field, or skipped
and counted under data.on_bad_record=skip), never a NaN loss later."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from llm_stages.data.datamodule import PairDataModule
from llm_stages.errors import DataFormatError


def _data(path, **kw):
    return OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None, **kw})


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _pair(i: int, **extra) -> str:
    return json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", **extra})


def test_identical_pairs_are_dropped_counted_and_reported_in_one_line(tmp_path, tokenizer, caplog):
    same = json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"})
    path = _write(tmp_path / "p.jsonl", [_pair(0), same, _pair(1), same, same, _pair(2)])
    dm = PairDataModule(_data(path), tokenizer, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="llm_stages.data.datamodule_base"):
        dm.setup()
    assert len(dm.train_set) == 3 and dm.stats == {"train_dropped_identical_pair": 3}
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == [f"{path}: 3 records dropped (identical pair: chosen equals rejected, no preference to learn), "
                     f"the first at {path}:2"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_margin_is_an_error_naming_the_record(tmp_path, tokenizer, value):
    path = _write(tmp_path / "p.jsonl", [_pair(0, margin=1.5), _pair(1)[:-1] + f', "margin": {value}}}', _pair(2)])
    with pytest.raises(DataFormatError) as e:
        PairDataModule(_data(path), tokenizer, batch_size=1).setup()
    assert (e.value.line, e.value.field) == (2, "margin")
    assert str(e.value).startswith(f"{path}:2: field 'margin': expected a finite number, got ")
    assert "data.on_bad_record=skip" in str(e.value)


def test_non_finite_margins_are_skipped_and_counted_under_skip(tmp_path, tokenizer, caplog):
    bad = [_pair(i)[:-1] + ', "margin": NaN}' for i in (1, 2)]
    path = _write(tmp_path / "p.jsonl", [_pair(0, margin=2.0), *bad, _pair(3)])
    dm = PairDataModule(_data(path, on_bad_record="skip"), tokenizer, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="llm_stages.data.datamodule_base"):
        dm.setup()
    assert dm.stats == {"train_skipped_bad_record": 2}
    assert sorted(p.margin for p in dm.train_set) == [0.0, 2.0]
    assert any(f"{path}:2: field 'margin'" in r.getMessage() for r in caplog.records)
