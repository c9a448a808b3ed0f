"""bench/prepare.py's long-context data (the sft_2k / dpo_2k workloads): demo records concatenated until a
sequence fills max_length, never past it, in order and deterministically (tests/e2e/test_bench_long_context.py
runs the workloads on both sides)."""

from __future__ import annotations

import json

import pytest

from bench.prepare import _messages, fill_conversations, fill_prompt_pairs


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    from llm_stages.data.render import ensure_chat_template

    ensure_chat_template(tokenizer)  # as bench/prepare.py's saved checkpoint has it
    return tokenizer


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_long_conversations_fill_max_length_with_consecutive_demo_conversations(demo_dir, chat_tokenizer):
    from llm_stages.data.render import render_conversation

    records = _records(demo_dir / "sft_train.jsonl")
    long = fill_conversations(records, chat_tokenizer, max_length=512, count=3)
    assert long == fill_conversations(records, chat_tokenizer, max_length=512, count=3)  # deterministic

    cursor = 0
    for conversation in long:
        turns = conversation["conversations"]
        # The next demo conversations in order, a system message only at the start.
        expected, start = [], cursor
        while len(expected) < len(turns):
            expected += [t for t in records[cursor]["conversations"] if not (expected and t["from"] == "system")]
            cursor += 1
        assert turns == expected and cursor - start > 5
        assert all(t["from"] != "system" for t in turns[1:])
        example = render_conversation(chat_tokenizer, _messages(turns))
        assert len(example.input_ids) <= 512
        # Full: the next conversation would not have fit.
        more = turns + [t for t in records[cursor]["conversations"] if t["from"] != "system"]
        assert len(render_conversation(chat_tokenizer, _messages(more)).input_ids) > 512
        # Every assistant turn is trained: one labelled span per reply.
        labelled = [label != -100 for label in example.labels]
        spans = sum(1 for i, on in enumerate(labelled) if on and (i == 0 or not labelled[i - 1]))
        assert spans == sum(t["from"] == "gpt" for t in turns)


def test_long_prompt_pairs_keep_their_replies_after_earlier_exchanges_up_to_max_length(demo_dir, chat_tokenizer):
    from llm_stages.data.kinds.pair import length, render_pair

    records = _records(demo_dir / "pref_train.jsonl")
    pairs = fill_prompt_pairs(records, chat_tokenizer, max_length=384, count=2)
    own = records[0]
    first = pairs[0]
    assert (first["chosen"], first["rejected"]) == (own["chosen"], own["rejected"])
    assert first["conversations"][-1] == own["conversations"][-1]  # the pair's own question comes last
    history = first["conversations"][:-1]
    exchanges = len(history) // 2
    assert exchanges > 3
    # The earlier exchanges are the next pairs' questions and chosen answers, in order.
    assert history[:2] == [records[1]["conversations"][0], {"from": "gpt", "value": records[1]["chosen"]}]
    assert pairs[1]["chosen"] == records[1 + exchanges]["chosen"]
    for pair in pairs:
        rendered = render_pair(chat_tokenizer, _messages(pair["conversations"]), pair["chosen"], pair["rejected"])
        assert 384 - 40 < length(rendered) <= 384


def test_filled_data_that_runs_out_of_demo_records_says_so(demo_dir, chat_tokenizer):
    records = _records(demo_dir / "sft_train.jsonl")[:30]
    with pytest.raises(SystemExit, match="demo conversations ran out after 0 long ones"):
        fill_conversations(records, chat_tokenizer, max_length=2048, count=5)
    pairs = _records(demo_dir / "pref_train.jsonl")[:30]
    with pytest.raises(SystemExit, match="demo pairs ran out after 0 long-prompt pairs"):
        fill_prompt_pairs(pairs, chat_tokenizer, max_length=2048, count=2)


@pytest.mark.slow  # fills 2,048-token records from ~2,000 demo problems: ~35 s
def test_the_default_bench_run_sizes_its_demo_data_within_the_demo_task(tmp_path, chat_tokenizer):
    """`make bench` (every default workload, default steps, 3 warm-up steps) asks the demo generator for
    no more problems than the task has, and the long-context workloads fill their records from them."""
    from bench.prepare import demo_problems, records_needed
    from bench.runner import DEFAULT_WORKLOADS
    from bench.workloads import WORKLOADS
    from llm_stages.data.demo import TRIPLES, write_demo_data

    workloads = [WORKLOADS[name] for name in DEFAULT_WORKLOADS]
    total_steps = {w.name: 3 + w.steps for w in workloads}
    problems = demo_problems(workloads, total_steps, n_val=8)
    assert 500 <= problems <= len(TRIPLES) - 8
    demo = write_demo_data(tmp_path / "demo", seed=0, n_train=problems, n_val=8)
    for name, fill, source in (("sft_2k", fill_conversations, "sft_train"), ("dpo_2k", fill_prompt_pairs, "pref_train")):
        w = WORKLOADS[name]
        count = records_needed(w, total_steps[name])
        assert len(fill(_records(demo[source]), chat_tokenizer, max_length=w.max_length, count=count)) == count
