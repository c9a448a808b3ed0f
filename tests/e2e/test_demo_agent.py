"""pipeline=demo_agent end to end with the real tiny model, shortened: SFT on the calculator transcripts,
GRPO whose episodes call the live calculator, the held-out episodes suite on both exports. The demo's
targets (val/reward <= 0.2 before GRPO, >= 0.8 after) are not reached yet (docs/agents.md: after SFT the
model calls in the right format but does not copy five- and six-digit numbers), so this checks that the
chain runs and reports, not that it learns."""

from __future__ import annotations

import json

from omegaconf import open_dict

SHORT = {"sft": ["trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.limit_val_batches=2"],
         "grpo": ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                  "datamodule.batch_size=4", "datamodule.val_batch_size=16", "module.mini_batch_size=32"]}


def test_demo_agent_chain_runs_episodes_with_the_calculator(tmp_path):
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
    assert rows["grpo"]["metric"] == "val/reward" and 0 <= rows["grpo"]["after"] <= 1
    [metrics_csv] = (tmp_path / "demo_agent" / "grpo").glob("csv/**/metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert {"env/turns_mean", "env/tool_calls_mean", "env/tool_errors", "env/truncated_fraction"} <= set(header)
    results = json.loads((tmp_path / "demo_agent" / "eval" / "results.json").read_text())
    for stage in ("sft", "grpo"):
        metrics = results[stage]["tasks"]["multiplication"]["metrics"]
        assert 0 <= metrics["success_rate"] <= 1 and metrics["turns_mean"] >= 1
