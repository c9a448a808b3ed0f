"""python -m bench's long-context workloads end to end on the tiny model: 2,048-token sequences, one step on
each side, the same tokens per step on both (nothing truncated on either). No timing is asserted."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_runs_the_2k_workloads_on_both_sides_with_equal_tokens_per_step(tmp_path):
    pytest.importorskip("trl")
    from bench.runner import main

    # sft_2k plain, dpo_2k with activation checkpointing on both sides (the _ckpt rows' only difference).
    names = ["sft_2k", "dpo_2k_ckpt"]
    assert main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--workloads", ",".join(names),
                 "--out-dir", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*-tiny-*.json")
    report = json.loads(path.read_text())
    for name in names:
        entry = report["workloads"][name]
        ours, trl = (entry["sides"][side]["median"] for side in ("ours", "trl"))
        assert "error" not in ours and "error" not in trl, name
        assert ours["timed_steps"] == trl["timed_steps"] == 1
        assert ours["tokens_per_step"] == trl["tokens_per_step"], name
        assert any("nothing truncated" in note for note in entry["notes"]), entry["notes"]
        assert entry["settings"]["max_length"] == 2048
    # Two conversations / one pair's two sequences of nearly 2,048 tokens each.
    assert 2 * 1900 < report["workloads"]["sft_2k"]["sides"]["ours"]["median"]["tokens_per_step"] <= 2 * 2048
    assert 2 * 1900 < report["workloads"]["dpo_2k_ckpt"]["sides"]["trl"]["median"]["tokens_per_step"] <= 2 * 2048
    assert "model.gradient_checkpointing=true" in report["workloads"]["dpo_2k_ckpt"]["our_overrides"]
    assert "model.gradient_checkpointing=true" not in report["workloads"]["sft_2k"]["our_overrides"]
