"""pipeline=demo_agent with the real tiny model: after SFT the greedy policy answers multiplications from
memory (val/reward near 0); GRPO with the calculator as a live tool makes calling it the first choice
(val/reward near 1). The margins cover what differs between seeds, CPUs and thread counts (numbers in
docs/agents.md)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.longest
def test_demo_agent_learns_to_call_the_calculator(tmp_path):
    from llm_stages.config import compose
    from llm_stages.pipeline import run_pipeline

    cli = [f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", "logger=csv"]
    rows = {r["stage"]: r for r in run_pipeline(compose(["pipeline=demo_agent", *cli], output_dir=str(tmp_path / "demo_agent")), cli)}
    assert list(rows) == ["sft", "grpo", "eval"] and all(r["status"] == "ran" for r in rows.values())
    grpo = rows["grpo"]
    assert grpo["metric"] == "val/reward"
    assert grpo["before"] <= 0.3  # greedy SFT policy: 0.0 seen (it calls the calculator on ~10% of sampled replies)
    assert grpo["after"] >= 0.7   # 0.9+ seen
    results = json.loads((tmp_path / "demo_agent" / "eval" / "results.json").read_text())
    held_out = {stage: results[stage]["tasks"]["multiplication"]["metrics"] for stage in ("sft", "grpo")}
    assert held_out["sft"]["success_rate"] <= 0.3 and held_out["grpo"]["success_rate"] >= 0.7
    assert held_out["grpo"]["tool_calls_mean"] >= 0.8
