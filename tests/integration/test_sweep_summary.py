"""Multirun sweeps: every job's config checked before the first one trains, and summary.csv /
summary.md in the sweep directory with a row per job (overrides, status, best and last value of
the stage's key metric, run dir, W&B run)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from llm_stages.training.sweep import job_error, read_rows, sweep_jobs, update_row
from tests.conftest import REPO, TEST_MODEL

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
QUICK = ["stage=sft", *TEST_MODEL, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~callbacks.generation_samples"]


def _sweep(args: list[str], cwd, demo_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llm_stages", "-m", f"paths.data_dir={demo_dir.parent}",
                           f"paths.log_dir={cwd}/runs", *QUICK, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.slow
def test_a_sweep_writes_a_summary_row_per_job_and_groups_its_wandb_runs(tmp_path, demo_dir):
    run = _sweep(["optim.lr=1e-3,3e-3", "logger=wandb"], tmp_path, demo_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    [sweep] = list((tmp_path / "runs" / "sft" / "multirun").iterdir())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["overrides"], r["status"], r["metric"]) for r in rows] == [
        ("0", "optim.lr=0.001", "completed", "val/loss"), ("1", "optim.lr=0.003", "completed", "val/loss")]
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert row["run_dir"] == str(sweep / row["job"])
        assert float(row["best"]) == pytest.approx(metrics["val/loss_best"], rel=1e-5)
        assert float(row["last"]) == pytest.approx(metrics["val/loss"], rel=1e-5)
        assert 0 < float(row["best"]) < 20
        assert "/wandb/offline-run-" in row["wandb_run"]
        [record] = list((sweep / row["job"] / "wandb").glob("offline-run-*/*.wandb"))
        assert f"sft-sweep-{sweep.name}".encode() in record.read_bytes()  # one W&B group per sweep
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0] == "| job | overrides | status | metric | best | last | run_dir | wandb_run |"
    assert table[2].startswith(f"| 0 | optim.lr=0.001 | completed | val/loss | {rows[0]['best']} | {rows[0]['last']} |")


@pytest.mark.slow
def test_a_bad_value_stops_the_sweep_before_any_job_trains(tmp_path, demo_dir):
    run = _sweep(["optim.lr=1e-3,-1", "logger=csv"], tmp_path, demo_dir)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: sweep job #1 (optim.lr=-1): optim.lr=-1: expected a number > 0, e.g. 1e-5; nothing was trained "
        "(fix the value and rerun the sweep)")
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists()  # no sweep dir, no run dir, no checkpoint


@pytest.mark.slow
def test_a_job_that_stops_on_bad_data_is_a_failed_row(tmp_path, demo_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"no": "messages"}\n')
    good = demo_dir / "sft_train.jsonl"
    run = _sweep([f"data.path={good},{bad}", "data.val_path=null", "data.val_ratio=0.1", "logger=csv"], tmp_path, demo_dir)
    assert run.returncode == 2 and f"error: {bad}:" in run.stderr
    [sweep] = list((tmp_path / "runs" / "sft" / "multirun").iterdir())
    rows = read_rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed")]
    assert rows[1]["overrides"] == f"data.path={bad}" and rows[1]["best"] == ""


def test_sweep_jobs_expand_the_command_line_as_the_basic_sweeper_does():
    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": BASIC, "params": {"seed": "1,2"}},
                                         "overrides": {"task": ["stage=sft", "optim.lr=1e-3,-1"]}}})
    # the values as the jobs get them (Hydra writes 1e-3 as 0.001)
    assert sweep_jobs(config) == [["seed=1", "stage=sft", "optim.lr=0.001"], ["seed=1", "stage=sft", "optim.lr=-1"],
                                  ["seed=2", "stage=sft", "optim.lr=0.001"], ["seed=2", "stage=sft", "optim.lr=-1"]]
    optuna = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                                                                   "OptunaSweeper"}, "overrides": {"task": []}}})
    assert sweep_jobs(optuna) is None


@pytest.mark.slow  # composes and checks three configs: ~20 s on a busy 2-core machine
def test_job_error_names_the_bad_value_and_none_for_a_good_job():
    assert job_error(["stage=sft", "optim.lr=1e-3"]) is None
    assert job_error(["stage=sft", "optim.lr=-1"]) == "optim.lr=-1: expected a number > 0, e.g. 1e-5"
    assert job_error(["stage=sft", "trainer.max_steps=0"]).startswith("trainer.max_steps=0: expected an integer >= 1")


def test_rows_are_replaced_by_job_number_and_kept_in_order(tmp_path):
    update_row(tmp_path, {"job": 1, "overrides": "optim.lr=2", "status": "running"})
    update_row(tmp_path, {"job": 0, "overrides": "optim.lr=1", "status": "completed", "best": 0.5, "last": 0.625})
    update_row(tmp_path, {"job": 1, "overrides": "optim.lr=2", "status": "failed"})
    assert [(r["job"], r["status"], r["best"]) for r in read_rows(tmp_path)] == [("0", "completed", "0.5"),
                                                                                  ("1", "failed", "")]
    assert (tmp_path / "summary.md").read_text().splitlines()[2:] == [
        "| 0 | optim.lr=1 | completed |  | 0.5 | 0.625 |  |  |", "| 1 | optim.lr=2 | failed |  |  |  |  |  |"]


@pytest.mark.slow  # composes a config per job
@pytest.mark.parametrize("sweeper, task, message", [
    (BASIC, ["stage=sft", "seed=1,2", "optim.lr=1e-3,-1"],
     "error: sweep job #1 (seed=1 optim.lr=-1): optim.lr=-1: expected a number > 0, e.g. 1e-5; nothing was trained"),
    ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", ["stage=sft", "trainer.max_steps=0"],
     "error: the sweep: trainer.max_steps=0: expected an integer >= 1"),  # optuna: the settings its trials share
])
def test_the_first_bad_job_is_one_line_and_exit_2(tmp_path, capsys, sweeper, task, message):
    from llm_stages.training.sweep import SweepSummary

    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": sweeper}, "sweep": {"dir": str(tmp_path / "sweep")},
                                         "overrides": {"task": task}}})
    with pytest.raises(SystemExit) as exit_:
        SweepSummary().on_multirun_start(config)
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "sweep").exists()
