"""Evaluation's pure parts against their definitions: pass@k, pair accuracy with ties, multiple-choice
records (answer as index or letter), the markdown table, the CLI's command word and unknown suites."""

from __future__ import annotations

import itertools
from math import comb

import pytest
import torch

from llm_stages.__main__ import command_argv
from llm_stages.data.kinds.choice import read_choice
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError
from llm_stages.evaluate.generation import pass_at_k
from llm_stages.evaluate.preference import pair_accuracy
from llm_stages.evaluate.run import markdown_table


def test_pass_at_k_is_the_probability_that_k_of_the_n_samples_include_a_correct_one():
    samples = [1, 0, 0, 1, 0]  # fixed samples of one prompt: 2 correct of 5
    for k in range(1, 6):
        subsets = list(itertools.combinations(samples, k))  # every way to draw k of the n samples
        by_definition = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(5, 2, k) == pytest.approx(by_definition)
        assert pass_at_k(5, 2, k) == pytest.approx(1 - comb(3, k) / comb(5, k))
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_pair_accuracy_counts_a_tie_half():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, -1.0])
    assert pair_accuracy(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 1.0]


def test_multiple_choice_answer_as_index_or_letter_and_columns():
    read = lambda data, columns=None: read_choice(Record("mc.jsonl", 3, data), columns=columns)  # noqa: E731
    assert read({"question": "2+2?", "choices": ["3", "4"], "answer": 1}).answer == 1
    assert read({"question": "2+2?", "choices": ["3", "4", 5], "answer": "b"}) == ("2+2?", ["3", "4", "5"], 1)
    assert read({"input": "q", "options": ["x", "y"], "target": "A"},
                {"question": "input", "choices": "options", "answer": "target"}).answer == 0
    with pytest.raises(DataFormatError, match=r"mc.jsonl:3: field 'answer': expected an index 0..1 or a letter A..B"):
        read({"question": "q", "choices": ["x", "y"], "answer": "C"})
    with pytest.raises(DataFormatError, match="field 'choices'"):
        read({"question": "q", "answer": 0})


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 0.5], ["y", None]]).splitlines() == [
        "| a | b |", "|---|---|", "| x | 0.5000 |", "| y | - |"]


def test_command_word_and_unknown_suite(capsys):
    assert command_argv(["m", "generate", "model.path=x"]) == ["m", "stage=generate", "model.path=x"]
    assert command_argv(["m", "stage=eval", "eval=demo"]) == ["m", "stage=eval", "eval=demo"]
    with pytest.raises(SystemExit) as exit_:
        command_argv(["m", "stage=eval", "eval=nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: eval=nope: no such eval suite") and "demo" in err


def test_a_task_set_to_null_is_left_out_and_no_task_left_is_one_error():
    from omegaconf import OmegaConf

    from llm_stages.errors import ConfigError
    from llm_stages.evaluate.run import check_suite

    cfg = OmegaConf.create({"eval": {"name": "demo", "tasks": {"arithmetic": {"type": "generation"}, "pairs": None}}})
    OmegaConf.set_struct(cfg, True)
    assert list(check_suite(cfg).tasks) == ["arithmetic"]  # eval.tasks.pairs=null on the command line
    cfg.eval.tasks.arithmetic = None
    with pytest.raises(ConfigError, match="has no tasks"):
        check_suite(cfg)
