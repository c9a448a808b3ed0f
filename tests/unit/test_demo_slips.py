"""The demo's SFT data with forgotten carries (llm_stages/data/demo.py, sft_slips_train.jsonl): each
slip is the right reply with the carry or borrow left out, only replies that have one slip, and at
about CARRY_SLIP_RATE of them."""

from __future__ import annotations

import json

from llm_stages.data.demo import CARRY_SLIP_RATE, slipped_solution, write_demo_data


def test_a_slip_forgets_the_carry_or_borrow_and_nothing_else():
    assert slipped_solution({"a": 47, "op": "+", "b": 5}) == "47 + 5 = 42"
    assert slipped_solution({"a": 95, "op": "+", "b": 8}) == "95 + 8 = 93"
    assert slipped_solution({"a": 41, "op": "-", "b": 7}) == "41 - 7 = 44"
    assert slipped_solution({"a": 43, "op": "+", "b": 6}) is None  # no carry
    assert slipped_solution({"a": 43, "op": "-", "b": 3}) is None  # no borrow
    assert slipped_solution({"a": 3, "op": "-", "b": 7}) is None  # negative result: nothing to forget


def test_the_slipped_file_is_the_training_conversations_with_a_share_of_carries_forgotten(tmp_path):
    paths = write_demo_data(tmp_path, seed=0, n_train=1000, n_val=50, n_test=50)
    clean = [json.loads(line) for line in paths["sft_train"].read_text().splitlines()]
    slipped = [json.loads(line) for line in paths["sft_slips_train"].read_text().splitlines()]
    assert len(clean) == len(slipped)
    with_carry = changed = 0
    for record, other in zip(clean, slipped):
        for turn, twin in zip(record["conversations"], other["conversations"]):
            if turn["from"] != "gpt":
                assert twin == turn
                continue
            a, op, b, _, _ = turn["value"].split()
            slip = slipped_solution({"a": int(a), "op": op, "b": int(b)})
            with_carry += slip is not None
            changed += twin["value"] != turn["value"]
            assert twin["value"] in (turn["value"], slip)
    assert with_carry > 300 and abs(changed / with_carry - CARRY_SLIP_RATE) < 0.06, (changed, with_carry)
