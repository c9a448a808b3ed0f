"""The agent demo's generated data: splits, transcripts as the tiny template renders and trains them,
RL prompts, and the experiment configs of pipeline=demo_agent composing."""

from __future__ import annotations

import json

import pytest

from llm_stages.data.demo_agent import AGENT_FILES, CALCULATOR_SCHEMA, write_agent_data

SIZES = {"train": 200, "val": 20, "test": 20}


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo_agent"
    write_agent_data(out, seed=0, sizes=SIZES)
    return out


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def exchanges(record) -> list[list[dict]]:
    """A transcript's questions, each with the turns that answer it."""
    out = []
    for message in record["messages"]:
        if message["role"] == "user":
            out.append([])
        out[-1].append(message)
    return out


def test_files_are_deterministic_and_splits_disjoint(agent_dir, tmp_path):
    again = write_agent_data(tmp_path / "again", seed=0, sizes=SIZES)
    assert set(again) == set(AGENT_FILES)
    assert all((agent_dir / AGENT_FILES[name]).read_text() == path.read_text() for name, path in again.items())
    questions = {split: {x[0]["content"] for r in read(agent_dir / f"sft_{split}.jsonl") for x in exchanges(r)}
                 for split in SIZES}
    assert len(questions["train"]) == 2 * SIZES["train"]  # as many additions/subtractions as multiplications
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]


def test_rl_prompts_are_multiplications_with_their_product(agent_dir):
    rows = read(agent_dir / "rl_val.jsonl")
    assert len(rows) == SIZES["val"]
    for row in rows:
        a, b = (int(w.strip("?.")) for w in row["question"].split() if w.strip("?.").isdigit())
        assert row["answer"] == str(a * b) and set(row) == {"question", "answer"}


def test_additions_always_call_the_calculator_multiplications_sometimes(agent_dir):
    records = read(agent_dir / "sft_train.jsonl")
    assert all(record["tools"] == [CALCULATOR_SCHEMA] and len(exchanges(record)) <= 3 for record in records)
    calls = {"*": 0, "other": 0}
    for turns in (x for record in records for x in exchanges(record)):
        op = "*" if "*" in turns[0]["content"] else "other"
        if len(turns) == 4:
            calls[op] += 1
            call, result, answer = turns[1:]
            assert call["tool_calls"][0]["function"]["name"] == "calculator"
            assert result == {"role": "tool", "name": "calculator", "content": answer["content"]}
        else:
            assert op == "*" and len(turns) == 2
    assert calls["other"] == SIZES["train"]
    assert 0 < calls["*"] < 0.25 * SIZES["train"]  # TOOL_FRACTION = 0.1
    assert all(len(x) == 4 for record in read(agent_dir / "sft_test.jsonl") for x in exchanges(record))


def test_transcript_trains_the_call_and_the_answer_only(agent_dir, tokenizer):
    from llm_stages.data.columns import record_tools
    from llm_stages.data.kinds.conversation import messages_messages
    from llm_stages.data.render import IGNORE_INDEX, render_conversation
    from llm_stages.data.sources import Record

    data = read(agent_dir / "sft_test.jsonl")[0]
    record = Record("sft_test.jsonl", 1, data)
    example = render_conversation(tokenizer, messages_messages(record), tools=record_tools(record))
    expected = ""
    for turns in exchanges(data):
        expression = turns[1]["tool_calls"][0]["function"]["arguments"]["expression"]
        expected += (f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n'
                     f"</tool_call><|im_end|>\n{turns[3]['content']}<|im_end|>\n")
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained == expected
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nYou can call these tools:\n")


def test_ensure_configured_writes_the_agent_files(tmp_path):
    from omegaconf import OmegaConf

    from llm_stages.data.demo import ensure_configured

    ensure_configured(OmegaConf.create({"demo": {"dir": str(tmp_path / "agent"), "seed": 0, "task": "agent"}}))
    assert sorted(p.name for p in (tmp_path / "agent").iterdir()) == sorted([*AGENT_FILES.values(), "demo_agent_spec.json"])


@pytest.mark.parametrize("experiment", ["demo_agent_sft", "demo_agent_grpo", "demo_agent_eval"])
def test_pipeline_experiments_compose(experiment, make_cfg):
    cfg = make_cfg(f"experiment={experiment}")
    if experiment == "demo_agent_grpo":
        assert cfg.model.path.endswith("demo_agent/sft/export") and cfg.data.path.endswith("demo_agent/rl_train.jsonl")
        assert cfg.rollout.tools[0]._target_ == "llm_stages.rollout.builtin_tools.calculator"
        assert cfg.rollout.episode.max_turns == 3


def test_pipeline_lists_sft_grpo_and_eval(make_cfg):
    cfg = make_cfg("pipeline=demo_agent")
    assert [s.name for s in cfg.pipeline.stages] == ["sft", "grpo", "eval"]
    assert list(cfg.pipeline.stages[2].evaluate) == ["sft", "grpo"]
