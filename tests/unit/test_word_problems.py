"""The generated arithmetic word problems (llm_stages/data/word_problems.py): deterministic, right answers,
disjoint splits, records the prompt reader takes, written on first use; the configs of pipeline=smollm2_arith."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from llm_stages.data.word_problems import OBJECTS, PEOPLE, ensure_word_problems, word_problems
from llm_stages.errors import ConfigError

SIZES = {"train": 300, "val": 100, "test": 100}
SHOTS = [["Tom has 5 pens. He buys 3 more. How many pens does Tom have now?", "5 + 3 = 8"]]
EXAMPLE = {"question": "Zoe has 8 shells. She loses 1 of them. How many shells does Zoe have left?", "answer": "7"}
NAMES = "|".join(name for name, _, _ in PEOPLE)
# Each phrase of a story and what it does to the running count: the answer worked out from the text alone.
STEPS = [
    (r"has (\d+) boxes with (\d+)|buys (\d+) boxes with (\d+)", lambda n, a, b: a * b),
    (r"^(?:{names}) has (\d+) \w+ and (?:{names}) has (\d+) \w+\. How many \w+ do they have together",
     lambda n, a, b: a + b),
    (r"^(?:{names}) has (\d+) \w+\.", lambda n, a: a),
    (r"buys (\d+) more|finds (\d+) more|gives (?:her|him) (\d+) more|already had (\d+)", lambda n, a: n + a),
    (r"gives (\d+) to|and (\d+) to|loses (\d+) of them|has (\d+) fewer", lambda n, a: n - a),
    (r"has (\d+) more \w+ than", lambda n, a: n + a),
]


def solve(question: str) -> int:
    """The answer of a story, read phrase by phrase (independently of the generator's templates)."""
    count, position = None, 0
    while True:
        found = []
        for pattern, step in STEPS:
            match = re.compile(pattern.format(names=NAMES)).search(question, position)
            if match:  # a pattern anchored with ^ matches only at the start
                found.append((match.start(), -len(match.group(0)), match, step))
        if not found:
            return count
        _, _, match, step = min(found, key=lambda f: f[:2])
        numbers = [int(g) for g in match.groups() if g is not None]
        count = step(count, *numbers)
        position = match.end()


def test_same_seed_same_problems_other_seed_others():
    assert word_problems(SIZES, seed=0) == word_problems(SIZES, seed=0)
    assert word_problems(SIZES, seed=0)["val"] != word_problems(SIZES, seed=1)["val"]
    # the held-out splits are drawn first: a larger training split leaves them as they were
    assert word_problems({**SIZES, "train": 350}, seed=0)["test"] == word_problems(SIZES, seed=0)["test"]


def test_answers_are_the_stories_results_and_whole_counts():
    records = [r for split in word_problems(SIZES, seed=0).values() for r in split]
    assert all(set(r) == {"question", "answer"} for r in records)
    assert [int(r["answer"]) for r in records] == [solve(r["question"]) for r in records]
    assert all(int(r["answer"]) >= 0 for r in records)
    assert word_problems({"val": 1}, seed=0)["val"][0] == EXAMPLE


def test_splits_share_no_problem_and_hold_the_two_step_share():
    splits = word_problems(SIZES, seed=0, two_step=0.3)

    def problem(question: str) -> str:  # the story without its names and objects: template and numbers
        return re.sub(rf"\b({NAMES}|{'|'.join(OBJECTS)}|She|He|her|him)\b", "_", question)

    problems = {split: {problem(r["question"]) for r in records} for split, records in splits.items()}
    assert problems["train"].isdisjoint(problems["val"]) and problems["train"].isdisjoint(problems["test"])
    assert problems["val"].isdisjoint(problems["test"])
    two_step = re.compile(r"more and gives|and then|already had| to \w+ and \d+ to")
    for split, records in splits.items():
        assert sum(bool(two_step.search(r["question"])) for r in records) == round(0.3 * SIZES[split])


def test_asking_for_more_problems_than_the_ranges_hold_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"too few distinct 1-step problems .* max_number=3"):
        word_problems({"train": 200}, max_number=3, max_factor=2, two_step=0.0)


def test_shots_come_before_the_question_and_the_prompt_reader_takes_the_records(tmp_path):
    from llm_stages.data.kinds.prompt import prompt_record
    from llm_stages.data.sources import read_records

    paths = ensure_word_problems(tmp_path / "arith_train.jsonl", size=20, val_size=5, test_size=5, shots=SHOTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arith_spec.json", "arith_test.jsonl", "arith_train.jsonl",
                                                          "arith_val.jsonl"]
    records = read_records(paths["val"])
    plain = word_problems({"train": 20, "val": 5, "test": 5})["val"]
    for record, expected in zip(records, plain):
        prompt = prompt_record(record)
        assert prompt.messages == [{"role": "user", "content": SHOTS[0][0]},
                                   {"role": "assistant", "content": SHOTS[0][1]},
                                   {"role": "user", "content": expected["question"]}]
        assert prompt.answer == expected["answer"]
    plain_record = prompt_record(read_records(ensure_word_problems(tmp_path / "plain_train.jsonl", 20, 5, 5)["val"])[0])
    assert plain_record.messages == [{"role": "user", "content": plain[0]["question"]}]


def test_written_once_and_again_when_a_setting_changes(tmp_path):
    out = tmp_path / "arith_train.jsonl"
    ensure_word_problems(out, size=20, val_size=5, test_size=5)
    out.write_text("kept\n")
    ensure_word_problems(out, size=20, val_size=5, test_size=5)
    assert out.read_text() == "kept\n"
    ensure_word_problems(out, size=20, val_size=5, test_size=5, max_number=12)
    assert len(out.read_text().splitlines()) == 20
    assert json.loads((tmp_path / "arith_spec.json").read_text())["max_number"] == 12
    with pytest.raises(ConfigError, match=r"name the word-problem training file <name>_train.jsonl"):
        ensure_word_problems(tmp_path / "arith.jsonl")
    with pytest.raises(ConfigError, match=r"data.shots=.*a pair \[question, reply\]"):
        ensure_word_problems(out, shots=[["only a question"]])
    with pytest.raises(ConfigError, match=r"data.two_step=1.5: expected a number in \[0, 1\]"):
        ensure_word_problems(out, two_step=1.5)
    with pytest.raises(ConfigError, match=r"data.max_number=2: expected a number >= 3"):
        ensure_word_problems(out, max_number=2)


def test_smollm2_arith_configs_compose_and_generate_their_data(make_cfg, tmp_path):
    from llm_stages.data.demo import ensure_configured

    cfg = make_cfg("experiment=smollm2_arith_grpo", "model=smollm2", f"paths.data_dir={tmp_path}/data", quiet=False)
    OmegaConf.resolve(cfg)
    assert cfg.model.name == "smollm2" and cfg.stage.name == "grpo" and cfg.stage.key_metric == "val/reward"
    assert cfg.rollout.rewards.correct.fn._target_ == "llm_stages.rollout.rewards.answer_match"
    assert cfg.module.mini_batch_size == cfg.datamodule.batch_size * cfg.module.num_generations
    assert cfg.trainer.max_steps < cfg.trainer.val_check_interval <= cfg.data.size // cfg.datamodule.batch_size
    ensure_configured(cfg.data)
    val = (tmp_path / "data" / "word_problems" / "arith_val.jsonl").read_text().splitlines()
    assert len(val) == cfg.data.val_size == cfg.datamodule.val_batch_size
    assert json.loads(val[0])["prompt"][:2] == [{"role": "user", "content": cfg.data.shots[0][0]},
                                                {"role": "assistant", "content": cfg.data.shots[0][1]}]
    pipeline = make_cfg("pipeline=smollm2_arith", quiet=False).pipeline
    assert [(s.name, list(s.overrides)) for s in pipeline.stages] == [("grpo", ["experiment=smollm2_arith_grpo"])]
