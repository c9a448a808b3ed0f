"""pipeline=...: stages chained through their exports, skipped when done, summarised in a table."""

from __future__ import annotations

import logging
from pathlib import Path

from llm_stages.config import compose
from llm_stages.pipeline import format_table, run_pipeline
from tests.conftest import QUIET, TEST_MODEL


def test_sft_dpo_pipeline_chains_exports_skips_done_stages_and_summarises(tmp_path, demo_dir, caplog):
    cli = [f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp_path}/runs", *TEST_MODEL, *QUIET,
           "logger=wandb", "trainer.max_steps=2", "trainer.limit_val_batches=1"]
    cfg = compose(["pipeline=sft_dpo", *cli], output_dir=str(tmp_path / "pipeline"))
    pipeline_dir = Path(cfg.pipeline.dir)
    assert pipeline_dir == tmp_path / "runs" / "pipelines" / "sft_dpo"
    assert f"model.path={pipeline_dir}/sft/export" in list(cfg.pipeline.stages[1].overrides)

    with caplog.at_level(logging.INFO):
        rows = run_pipeline(cfg, cli)
    assert [(r["stage"], r["status"], r["steps"]) for r in rows] == [("sft", "ran", 2), ("dpo", "ran", 2)]
    assert rows[0]["metric"] == "val/loss" and rows[1]["metric"] == "val/rewards/accuracies"
    assert all(Path(r["export"], "config.json").is_file() for r in rows)
    assert "pipeline sft_dpo summary" in caplog.text and "val/rewards/accuracies" in caplog.text
    # The pipeline's W&B run (offline) holds the summary table; the stage runs share its group.
    [summary_run] = list((pipeline_dir / "wandb").glob("offline-run-*"))
    assert list(summary_run.glob("*.wandb"))
    assert len(list((pipeline_dir / "sft" / "wandb").glob("offline-run-*"))) == 1

    again = run_pipeline(cfg, cli)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    forced = compose(["pipeline=sft_dpo", "pipeline.force=true", *cli], output_dir=str(tmp_path / "pipeline"))
    assert [r["status"] for r in run_pipeline(forced, cli)] == ["ran", "ran"]


def test_summary_table_format():
    rows = [{"stage": "sft", "status": "ran", "steps": 10, "wall_s": 3.5, "metric": "val/loss", "before": 7.25,
             "after": 1.125, "export": "runs/x/export"},
            {"stage": "dpo", "status": "skipped", "steps": None, "wall_s": None, "metric": None, "before": None,
             "after": None, "export": "runs/y/export"}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["stage", "status", "steps", "wall_s", "metric", "before", "after", "export"]
    assert lines[1].split() == ["sft", "ran", "10", "3.5", "val/loss", "7.2500", "1.1250", "runs/x/export"]
    assert lines[2].split() == ["dpo", "skipped", "-", "-", "-", "-", "-", "runs/y/export"]
