"""Generated data files are rewritten when the stamp beside them (llm_stages/data/generated.py) says an
older generator or other settings wrote them, and left alone otherwise."""

from __future__ import annotations

import json

from llm_stages.data import demo, demo_agent
from llm_stages.data.generated import is_current, write_spec


def test_is_current_needs_the_same_spec_and_every_file(tmp_path):
    data, stamp = tmp_path / "x.jsonl", tmp_path / "x_spec.json"
    data.write_text("{}\n")
    assert not is_current(stamp, {"seed": 0}, [data])  # no stamp yet
    write_spec(stamp, {"seed": 0, "shots": [("q", "a")]})
    assert is_current(stamp, {"seed": 0, "shots": [("q", "a")]}, [data])  # tuples compare as their JSON lists
    assert not is_current(stamp, {"seed": 1, "shots": [("q", "a")]}, [data])
    assert not is_current(stamp, {"seed": 0, "shots": [("q", "a")]}, [data, tmp_path / "missing.jsonl"])
    stamp.write_text("{not json")
    assert not is_current(stamp, {"seed": 0}, [data])


def test_demo_files_an_older_generator_wrote_are_rewritten(tmp_path, monkeypatch):
    paths = demo.write_demo_data(tmp_path, n_train=100, n_val=20)  # fewer problems than the default, as tests write
    assert json.loads((tmp_path / "demo_spec.json").read_text()) == {"version": demo.DEMO_DATA_VERSION, "seed": 0}
    pt = paths["pt_train"]
    pt.write_text("stale\n")
    demo.ensure_demo_data(tmp_path)
    assert pt.read_text() == "stale\n"  # same version and seed: left alone, whatever its size
    monkeypatch.setattr(demo, "DEMO_DATA_VERSION", demo.DEMO_DATA_VERSION + 1)
    demo.ensure_demo_data(tmp_path, n_train=100, n_val=20)
    assert pt.read_text() != "stale\n"
    demo.ensure_demo_data(tmp_path, seed=1, n_train=100, n_val=20)
    assert json.loads((tmp_path / "demo_spec.json").read_text())["seed"] == 1


def test_agent_demo_files_an_older_generator_wrote_are_rewritten(tmp_path, monkeypatch):
    paths = demo_agent.ensure_agent_data(tmp_path)
    paths["rl_test"].write_text("stale\n")
    demo_agent.ensure_agent_data(tmp_path)
    assert paths["rl_test"].read_text() == "stale\n"
    monkeypatch.setattr(demo_agent, "AGENT_DATA_VERSION", demo_agent.AGENT_DATA_VERSION + 1)
    demo_agent.ensure_agent_data(tmp_path)
    assert paths["rl_test"].read_text() != "stale\n"
