"""python -m bench's long-context path end to end on the tiny model: the dpo_2k_ckpt workload (2,048-token
pairs, activation checkpointing on both sides), one step on each side, the same tokens per step on both
(nothing truncated on either). No timing is asserted. One workload is enough here: sft_2k goes through the
same runner, and both fillers (conversations and pairs) are tested in tests/integration/test_bench_long_context.py."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_runs_a_2k_workload_on_both_sides_with_equal_tokens_per_step(tmp_path):
    pytest.importorskip("trl")
    from bench.runner import main
    from bench.workloads import WORKLOADS, our_overrides

    name = "dpo_2k_ckpt"
    assert main(["--model", "tiny", "--steps", "1", "--warmup", "0", "--workloads", name,
                 "--out-dir", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*-tiny-*.json")
    entry = json.loads(path.read_text())["workloads"][name]
    ours, trl = (entry["sides"][side]["median"] for side in ("ours", "trl"))
    assert "error" not in ours and "error" not in trl, entry
    assert ours["timed_steps"] == trl["timed_steps"] == 1
    assert ours["tokens_per_step"] == trl["tokens_per_step"]
    assert any("nothing truncated" in note for note in entry["notes"]), entry["notes"]
    assert entry["settings"]["max_length"] == 2048
    # One pair's two sequences of nearly 2,048 tokens each.
    assert 2 * 1900 < trl["tokens_per_step"] <= 2 * 2048
    assert "model.gradient_checkpointing=true" in entry["our_overrides"]

    # The _ckpt rows differ from the plain ones only in activation checkpointing.
    def overrides(workload: str) -> list[str]:
        return our_overrides(WORKLOADS[workload], checkpoint="c", data_path="d", cache_dir="c", log_dir="l",
                             total_steps=1, trainer="cpu", seed=0)

    for plain in ("sft_2k", "dpo_2k"):
        assert set(overrides(f"{plain}_ckpt")) ^ set(overrides(plain)) == {"model.gradient_checkpointing=true"}
