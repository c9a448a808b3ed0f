"""`python -m llm_stages.data inspect`: the report on SFT, preference and PT files, and the CLI (its main,
in this process: what `python -m llm_stages.data` runs)."""

from __future__ import annotations

import json

from llm_stages.data.__main__ import main
from llm_stages.data.describe import length_stats
from llm_stages.data.inspect import inspect_overrides, render_report

SFT_RECORDS = [
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "2 + 3 = 5"},
                       {"from": "human", "value": "And 4 + 4?"}, {"from": "gpt", "value": "4 + 4 = 8"}]},
    {"conversations": [{"from": "human", "value": "7 - 1 = ?"}, {"from": "gpt", "value": "7 - 1 = 6"}]},
]
PAIR_RECORDS = [
    {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6"},
    {"prompt": "7 - 1 = ?", "chosen": "7 - 1 = 6", "rejected": "7 + 1 = 8"},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _paths(tmp_path):
    return [f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/runs"]


def test_sft_report_counts_format_lengths_and_marked_example(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "chat.jsonl", SFT_RECORDS)
    report = inspect_overrides(["stage=sft", "data=file", f"data.path={path}", "datamodule.batch_size=1", *_paths(tmp_path)])

    assert report.stage == "sft" and report.datamodule == "SFTDataModule"
    assert report.files == [{"split": "train", "path": str(path), "records": 2, "unit": "records"}]
    assert (report.format, report.format_from) == ("sharegpt", "detected")
    assert (report.train_examples, report.val_examples, report.stats) == (2, 0, {})
    assert report.val_from == "none"  # val_ratio 0.05 of 2 records holds out nothing
    # Exactly the two assistant replies (each with its <|im_end|> and the newline after it, as TRL) are trained.
    assert report.sample["example"] == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n[[2 + 3 = 5<|im_end|>\n]]"
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n[[4 + 4 = 8<|im_end|>\n]]")

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    first_trained = n("2 + 3 = 5<|im_end|>\n") + n("4 + 4 = 8<|im_end|>\n")
    second_trained = n("7 - 1 = 6<|im_end|>\n")
    trained = report.lengths["trained"]
    assert (trained["min"], trained["max"], trained["mean"]) == (second_trained, first_trained,
                                                                (first_trained + second_trained) / 2)
    assert report.lengths["sequence"]["max"] > report.lengths["sequence"]["min"] > trained["max"]

    text = render_report(report)
    assert "format:     sharegpt (detected)" in text and "examples:   2 train / 0 val" in text
    assert "nothing dropped or truncated" in text

    shorter = report.lengths["sequence"]["min"] + 2  # the one-turn record fits, the two-turn one is cut
    explicit = inspect_overrides(["stage=sft", "data=file", f"data.path={path}", "data.format=sharegpt",
                                  "datamodule.batch_size=1", f"datamodule.max_length={shorter}", *_paths(tmp_path)])
    assert (explicit.format, explicit.format_from) == ("sharegpt", "data.format")
    assert explicit.stats == {"train_truncated": 1}
    assert explicit.lengths["sequence"]["max"] == shorter
    assert "train_truncated=1" in render_report(explicit)


def test_preference_report_shows_chosen_and_rejected(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIR_RECORDS)
    report = inspect_overrides(["stage=dpo", "data=file", f"data.path={path}", "datamodule.batch_size=1", *_paths(tmp_path)])

    assert report.datamodule == "PairDataModule" and report.files[0]["records"] == 2
    assert (report.format, report.format_from) == ("prompt_pair", "detected")
    assert (report.train_examples, report.val_examples) == (2, 0)
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert report.sample == {"chosen": prompt + "[[2 + 3 = 5<|im_end|>\n]]", "rejected": prompt + "[[2 + 3 = 6<|im_end|>\n]]"}
    assert set(report.lengths) == {"chosen sequence", "chosen trained", "rejected sequence", "rejected trained"}
    text = render_report(report)
    assert "--- chosen" in text and "--- rejected" in text


def test_rl_prompt_report_shows_the_rendered_prompt_and_answers(tmp_path):
    records = [{"question": "What is 2 + 3?", "answer": "Two and three... #### 5"}, {"prompt": "7 - 1 = ?"},
               {"question": "x" * 400, "answer": "1"}]
    path = _jsonl(tmp_path / "prompts.jsonl", records)
    report = inspect_overrides(["stage=grpo", "data=file", f"data.path={path}", "datamodule.batch_size=1",
                                "datamodule.max_prompt_length=64", "data.val_ratio=0", *_paths(tmp_path)])
    assert report.datamodule == "PromptDataModule" and (report.format, report.format_from) == ("question", "detected")
    assert report.train_examples == 2 and report.stats == {"train_dropped_prompt_too_long": 1}
    assert report.sample == {"prompt": "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"}
    assert "reference answer '5'" in report.sample_note and "1 of 2 prompts have one" in report.sample_note
    assert "[[" not in render_report(report)


def test_pt_report_shows_the_first_block_unmarked(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"document {i} says {i} plus {i} equals {2 * i}." for i in range(12)), encoding="utf-8")
    report = inspect_overrides(["stage=pt", "data=file", f"data.path={path}", "datamodule.block_size=16",
                                "datamodule.batch_size=1", *_paths(tmp_path)])

    assert report.files[0] == {"split": "train", "path": str(path), "records": 12, "unit": "documents"}
    assert (report.format, report.stats) == ("text", {})
    assert report.lengths["sequence"] == {"min": 16, "mean": 16.0, "p50": 16, "p95": 16, "max": 16}
    assert report.lengths["trained"]["max"] == 15  # the first position predicts nothing
    first_doc = tokenizer("document 0 says 0 plus 0 equals 0.", add_special_tokens=False)["input_ids"]
    assert report.sample["block"] == tokenizer.decode((first_doc + [tokenizer.eos_token_id])[:16])
    assert "[[" not in render_report(report)


def test_length_stats_nearest_rank():
    assert length_stats(list(range(20, 0, -1))) == {"min": 1, "mean": 10.5, "p50": 10, "p95": 19, "max": 20}


def test_usage_without_subcommand(capsys):
    assert main([]) == 2 and main(["stats"]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m llm_stages.data inspect")


def test_cli_prints_the_report(tmp_path, monkeypatch, capsys):
    _jsonl(tmp_path / "chat.jsonl", SFT_RECORDS)
    monkeypatch.chdir(tmp_path)  # data.path=chat.jsonl: relative to where the command runs
    code = main(["inspect", "stage=sft", "data=file", "data.path=chat.jsonl", "datamodule.batch_size=1", *_paths(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    for expected in ("stage:      sft (SFTDataModule)", "train data: chat.jsonl (2 records)", "format:     sharegpt (detected)",
                     "examples:   2 train / 0 val", "[[2 + 3 = 5<|im_end|>", "[[4 + 4 = 8<|im_end|>"):
        assert expected in lines, out
    assert any(line.startswith("  trained ") for line in lines)
    assert not (tmp_path / "runs").exists()  # nothing but the tokenization cache is written


def test_cli_malformed_json_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SFT_RECORDS[0]) + "\n" + '{"conversations": [\n', encoding="utf-8")
    assert main(["inspect", "stage=sft", "data=file", f"data.path={path}", *_paths(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: invalid JSON"), err
    assert len(err.strip().splitlines()) == 1
