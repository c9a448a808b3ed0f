"""reasoning-gym tasks as RL prompts (llm_stages/envs/reasoning_gym.py): the files the prompt reader
takes, the reward equal to the task's own verifier, the one-line error without the extra. Skipped
where reasoning-gym is not installed (pip install 'llm_stages[envs]'), except the missing-extra test."""

from __future__ import annotations

import json
import sys

import pytest

from llm_stages.envs import reasoning_gym as rg_env
from llm_stages.errors import ConfigError


@pytest.fixture
def without_reasoning_gym(monkeypatch):
    rg_env._dataset.cache_clear()
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now fails as if absent
    yield
    rg_env._dataset.cache_clear()


def test_missing_extra_is_one_line_naming_the_install(without_reasoning_gym):
    with pytest.raises(ConfigError) as error:
        rg_env.task_records("leg_counting", 2)
    message = str(error.value)
    assert "\n" not in message
    assert message == ("llm_stages.envs.reasoning_gym needs reasoning-gym, which is not installed: "
                       "pip install 'llm_stages[envs]' (or pip install reasoning-gym)")
    with pytest.raises(ConfigError, match="not installed"):
        rg_env.score(["<answer>1</answer>"], fields=[{"task": "leg_counting", "metadata": {}}])


def test_missing_extra_on_the_command_line(without_reasoning_gym, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        rg_env.main(["--task", "leg_counting", "--size", "2", "--out", str(tmp_path / "legs_train.jsonl")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: llm_stages.envs.reasoning_gym needs reasoning-gym")


@pytest.fixture
def rg():
    return pytest.importorskip("reasoning_gym")


def test_written_records_are_prompts_the_reader_takes(tmp_path, rg):
    from llm_stages.data.kinds.prompt import prompt_record
    from llm_stages.data.sources import read_records

    paths = rg_env.write_task_data(tmp_path / "legs_train.jsonl", "leg_counting", size=6, val_size=2, seed=0)
    assert paths == {"train": tmp_path / "legs_train.jsonl", "val": tmp_path / "legs_val.jsonl"}
    train, val = read_records(paths["train"]), read_records(paths["val"])
    assert (len(train), len(val)) == (6, 2)

    expected = rg.create_dataset("leg_counting", seed=0, size=8)
    first = prompt_record(train[0])
    assert first.messages == [{"role": "system", "content": rg.utils.SYSTEM_PROMPTS["default"]},
                              {"role": "user", "content": expected[0]["question"]}]
    assert first.answer == expected[0]["answer"]
    assert first.fields["task"] == "leg_counting"
    assert first.fields["metadata"] == json.loads(json.dumps(expected[0]["metadata"]))  # tuples as lists
    # validation continues the same generated dataset: no question is in both files
    assert prompt_record(val[0]).messages[-1]["content"] == expected[6]["question"]
    assert not {r.data["prompt"] for r in train} & {r.data["prompt"] for r in val}


def test_score_is_the_tasks_verifier_on_the_answer_tags(rg):
    records = rg_env.task_records("leg_counting", 3, seed=1, system_prompt=None)
    entries = list(rg.create_dataset("leg_counting", seed=1, size=3))
    answer = records[0]["answer"]
    completions = [f"Counting legs... <answer>{answer}</answer>",              # right
                   f"<answer>{int(answer) + 2}</answer>",                    # wrong
                   f"The answer is {answer}.",                               # no tags: nothing to score
                   f"<answer>7</answer> then <answer>{answer}</answer>",     # the last tag counts
                   f"<answer>{answer} legs</answer>"]                        # the verifier decides on extra words
    fields = [records[0]] * len(completions)
    verifier = rg.get_score_answer_fn("leg_counting")
    expected = [verifier(rg.utils.extract_answer(c), entries[0]) for c in completions]
    scores = rg_env.score(completions, fields=fields)
    assert scores == expected
    assert scores[:4] == [1.0, 0.0, 0.0, 1.0]


def test_score_gives_partial_credit_where_the_task_does(rg):
    records = rg_env.task_records("word_sorting", 2, seed=0, system_prompt=None)
    entry = rg.create_dataset("word_sorting", seed=0, size=2)[0]
    completions = [f"<answer>{records[0]['answer']}</answer>", "<answer>zzz, aaa</answer>"]
    scores = rg_env.score(completions, fields=[records[0]] * 2)
    verifier = rg.get_score_answer_fn("word_sorting")
    assert scores == [verifier(rg.utils.extract_answer(c), entry) for c in completions]
    assert scores[0] == 1.0 and scores[1] < 1.0


def test_score_without_the_records_it_reads_is_one_line(rg):
    with pytest.raises(ConfigError, match="passes the rewards no fields="):
        rg_env.score(["<answer>3</answer>"], prompts=["How many legs?"], answers=["3"])
    with pytest.raises(ConfigError, match=r"a prompt record has no 'task' field \(keys: \['answer', 'prompt'\]\)"):
        rg_env.score(["<answer>3</answer>"], fields=[{"prompt": "How many legs?", "answer": "3"}])


def test_task_config_reaches_generation_and_scoring(rg):
    records = rg_env.task_records("basic_arithmetic", 4, seed=0, config={"min_terms": 2, "max_terms": 2,
                                                                          "min_digits": 1, "max_digits": 1})
    assert all(r["task_config"]["max_terms"] == 2 for r in records)
    assert rg_env.score([f"<answer>{r['answer']}</answer>" for r in records], fields=records) == [1.0] * 4


def test_bad_task_and_config_are_one_line(rg):
    with pytest.raises(ConfigError, match=r"^reasoning-gym has no task 'leg_count'; one of: .*leg_counting"):
        rg_env.task_records("leg_count", 2)
    with pytest.raises(ConfigError, match=r"^reasoning-gym task 'leg_counting' refuses the config \{'legs': 3\}"):
        rg_env.task_records("leg_counting", 2, config={"legs": 3})
    with pytest.raises(ConfigError, match="system prompt 'terse' is not one of reasoning-gym's"):
        rg_env.task_records("leg_counting", 2, system_prompt="terse")


def test_command_line_writes_train_and_val(tmp_path, capsys, rg):
    out = tmp_path / "rg" / "legs_train.jsonl"
    rg_env.main(["--task", "leg_counting", "--size", "4", "--val-size", "2", "--seed", "3", "--out", str(out)])
    assert capsys.readouterr().out.split() == ["train:", str(out), "val:", str(tmp_path / "rg" / "legs_val.jsonl")]
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["answer"] == rg.create_dataset("leg_counting", seed=3, size=1)[0]["answer"]
    with pytest.raises(SystemExit) as exit_:
        rg_env.main(["--task", "leg_counting", "--out", str(tmp_path / "legs.jsonl")])
    assert exit_.value.code == 2
    assert "name the training file <name>_train.jsonl" in capsys.readouterr().err


def test_data_config_writes_the_files_on_first_use_and_rewrites_them_when_settings_change(make_cfg, tmp_path, rg):
    from llm_stages.data.demo import ensure_configured
    from llm_stages.rollout.rewards import check_reward_inputs

    cfg = make_cfg("experiment=reasoning_gym", f"paths.data_dir={tmp_path}/data", "data.size=5", "data.val_size=2")
    assert cfg.data.path == f"{tmp_path}/data/reasoning_gym/leg_counting_train.jsonl"
    ensure_configured(cfg.data)
    train = tmp_path / "data" / "reasoning_gym" / "leg_counting_train.jsonl"
    assert len(train.read_text().splitlines()) == 5
    assert len(train.with_name("leg_counting_val.jsonl").read_text().splitlines()) == 2
    written = train.stat().st_mtime_ns
    ensure_configured(cfg.data)  # same settings: kept
    assert train.stat().st_mtime_ns == written

    from hydra.utils import instantiate
    rewards = {"correct": instantiate(cfg.rollout.rewards.correct.fn)}
    check_reward_inputs(rewards, cfg.data)  # the records hold what `score` reads

    cfg = make_cfg("experiment=reasoning_gym", f"paths.data_dir={tmp_path}/data", "data.size=3", "data.val_size=2")
    ensure_configured(cfg.data)
    assert len(train.read_text().splitlines()) == 3
