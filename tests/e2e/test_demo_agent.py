"""pipeline=demo_agent end to end with the real tiny model: SFT on the calculator transcripts (as
shipped), GRPO whose episodes call the live calculator (10 of its 40 iterations), the held-out
episodes suite on both exports.

The demo's target (greedy val/reward <= 0.2 before GRPO, >= 0.8 after) is met with the default seed
(0.00 -> 0.98 after 10 iterations, 1.00 after 40) and with seed 2 (0.76, 0.88), but not with seed 1,
whose SFT export copies the operands into the call on 22 % of forced calls instead of ~90 %
(0.00 -> 0.06; docs/agents.md). So this asserts what held for all three seeds: SFT's greedy episodes
answer from memory, and GRPO makes the policy call the calculator more and answer no worse."""

from __future__ import annotations

import json

from omegaconf import open_dict

SHORT = {"grpo": ["trainer.max_steps=10", "trainer.val_check_interval=10"]}


def test_demo_agent_learns_to_call_the_calculator(tmp_path):
    from llm_stages.config import compose
    from llm_stages.pipeline import run_pipeline

    cli = [f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false", "logger=csv"]
    cfg = compose(["pipeline=demo_agent", *cli], output_dir=str(tmp_path / "demo_agent"))
    with open_dict(cfg):
        for step in cfg.pipeline.stages:
            step.overrides = [*step.overrides, *SHORT.get(step.name, [])]
    rows = {r["stage"]: r for r in run_pipeline(cfg, cli)}
    assert list(rows) == ["sft", "grpo", "eval"] and all(r["status"] == "ran" for r in rows.values())
    assert rows["grpo"]["metric"] == "val/reward"
    assert rows["grpo"]["before"] <= 0.2 and rows["grpo"]["after"] >= rows["grpo"]["before"], rows["grpo"]
    [metrics_csv] = (tmp_path / "demo_agent" / "grpo").glob("csv/**/metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert {"env/turns_mean", "env/tool_calls_mean", "env/tool_errors", "env/truncated_fraction"} <= set(header)
    results = json.loads((tmp_path / "demo_agent" / "eval" / "results.json").read_text())
    sft, grpo = (results[stage]["tasks"]["multiplication"]["metrics"] for stage in ("sft", "grpo"))
    assert sft["success_rate"] <= 0.2 and sft["tool_calls_mean"] <= 0.2, sft
    assert grpo["tool_calls_mean"] > sft["tool_calls_mean"] and grpo["success_rate"] >= sft["success_rate"], grpo
