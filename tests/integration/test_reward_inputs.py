"""A rule reward whose input the data lacks (no reference answer for answer_match) would score 0 for
every reply; before any rollout it is one ConfigError naming the reward, the record and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llm_stages.errors import ConfigError
from llm_stages.rollout.rewards import (answer_closeness, answer_match, check_reward_inputs, demo_equation,
                                        format_match, reads, reward_inputs)
from llm_stages.train import train

GRPO = ["stage=grpo", "module.num_generations=2", "module.mini_batch_size=8", "rollout.generation.max_new_tokens=4",
        "datamodule.batch_size=4", "datamodule.val_batch_size=4", "trainer.limit_val_batches=1",
        "validate_before_fit=false", "trainer.max_steps=1", "export.enabled=false"]
ANSWER_FIELDS = "answer/reference/gt_answer/ground_truth/final_answer/solution/output/target"


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def no_answers(tmp_path) -> Path:
    """GRPO prompts whose answers sit in a field the reader does not know."""
    return _write(tmp_path / "prompts.jsonl", [{"question": f"What is {i} + 1?", "result": str(i + 1)} for i in range(16)])


def test_the_built_in_rewards_declare_what_they_read():
    assert reward_inputs(answer_match) == ("answers",) == reward_inputs(answer_closeness)
    assert reward_inputs(demo_equation) == ("prompts",)
    assert reward_inputs(format_match) == ()


def test_answer_match_without_answers_is_one_line_before_training(no_answers, make_cfg, monkeypatch):
    monkeypatch.setattr("llm_stages.stages.rl.RLStage.training_step",
                        lambda *a, **k: pytest.fail("trained without reference answers"))
    cfg = make_cfg(*GRPO, "data=file", f"data.path={no_answers}")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == (
        f"reward correct (answer_match) reads each prompt's reference answer, but {no_answers} record 1 has none (no "
        f"field {ANSWER_FIELDS}, nor a final assistant turn; record keys: ['question', 'result']); map yours with "
        "data.columns.answer=<your field>")


def test_mapping_the_answer_field_passes(no_answers):
    data = OmegaConf.create({"path": str(no_answers), "columns": {"answer": "result"}})
    check_reward_inputs({"correct": answer_match}, data)


def test_one_record_without_an_answer_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"question": "1 + 1?", "answer": "2"}, {"question": "2 + 2?", "answer": None}])
    with pytest.raises(ConfigError, match=rf"but {path} record 2 has none"):
        check_reward_inputs({"correct": answer_match}, OmegaConf.create({"path": str(path)}))


def test_rewards_that_read_no_answers_do_not_need_them(no_answers):
    from functools import partial

    data = OmegaConf.create({"path": str(no_answers)})
    check_reward_inputs({"format": partial(format_match, pattern=".*"), "equation": demo_equation}, data)


def test_a_declared_record_field_is_checked(tmp_path):
    @reads("fields.difficulty")
    def by_difficulty(completions, **_):
        return [0.0] * len(completions)

    path = _write(tmp_path / "p.jsonl", [{"question": "1 + 1?", "answer": "2", "difficulty": 1},
                                         {"question": "2 + 2?", "answer": "4"}])
    with pytest.raises(ConfigError) as error:
        check_reward_inputs({"hard": by_difficulty}, OmegaConf.create({"path": str(path)}))
    assert str(error.value) == (f"reward hard (by_difficulty) reads the record field 'difficulty', but {path} record 2 "
                                "has none (record keys: ['answer', 'question']); add it to the data, or use another reward")
