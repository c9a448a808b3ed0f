"""A run that cannot start, cannot resume, or stops says so in one line and leaves its outcome in
<run dir>/status.yaml; an unreadable newest checkpoint is passed over for the newest readable one;
progress counts optimiser steps of trainer.max_steps everywhere; last.ckpt is also written on a clock."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.progress import StepProgressBar
from callbacks.timed_checkpoint import TimedCheckpoint
from llm_stages.errors import ConfigError, TrainingInterrupted
from llm_stages.train import train
from llm_stages.training.run_dir import checkpoint_problem, resolve_checkpoint
from llm_stages.training.run_status import CheckRunDir, run_dir_problem
from tests.conftest import REPO, TEST_MODEL

TINY_SFT = ["stage=sft", "datamodule.batch_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "export.enabled=false", "validate_before_fit=false"]
PPO = ["stage=ppo", "+rollout.rewards.equation={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, "
       "_partial_: true}}", "module.mini_batch_size=2", "module.ppo_epochs=2", "rollout.generation.max_new_tokens=8",
       "datamodule.batch_size=4", "datamodule.val_batch_size=8", "trainer.limit_val_batches=1", "validate_before_fit=false",
       "export.enabled=false"]


def _status(run_dir) -> dict:
    return yaml.safe_load((Path(run_dir) / "status.yaml").read_text())


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "llm_stages", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step}, path)
    return path


# --- an unwritable run directory -------------------------------------------------------------------

def test_a_run_dir_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_dir_problem(blocker / "run") == "Not a directory"
    assert run_dir_problem(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
    with pytest.raises(SystemExit) as stop:
        CheckRunDir._check("hydra.run.dir", str(blocker / "run"))
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: hydra.run.dir={blocker}/run: cannot create the run directory "
                                       "(Not a directory); pass hydra.run.dir=<a writable directory>\n")


@pytest.mark.slow
def test_cli_with_an_unwritable_run_dir_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = _cli(tmp_path, "stage=sft", "logger=none", f"hydra.run.dir={blocker}/run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: hydra.run.dir={blocker}/run: cannot create the run "
                                                    "directory (Not a directory); pass hydra.run.dir=<a writable directory>")
    done = _cli(tmp_path, "-m", "stage=sft", "logger=none", "seed=1,2", f"hydra.sweep.dir={blocker}/sweep")
    assert done.returncode == 2 and done.stderr.strip().endswith("pass hydra.sweep.dir=<a writable directory>")


# --- resuming from what is on disk ---------------------------------------------------------------

def test_a_truncated_last_ckpt_falls_back_to_the_newest_readable_one(make_cfg, caplog):
    cfg = make_cfg("stage=sft", "resume=auto")
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    older = _fake_checkpoint(checkpoints / "step000002.ckpt", 2)
    good = _fake_checkpoint(checkpoints / "step000004.ckpt", 4)
    last = _fake_checkpoint(checkpoints / "last.ckpt", 6)
    last.write_bytes(last.read_bytes()[:200])  # a full disk, a killed copy
    for i, path in enumerate((older, good, last)):
        os.utime(path, (i + 1, i + 1))
    with caplog.at_level(logging.INFO, logger="llm_stages.training.run_dir"):
        assert resolve_checkpoint(cfg) == str(good)
        assert resolve_checkpoint(make_cfg("stage=sft", "ckpt_path=last")) == str(good)
    assert ("resume: last.ckpt is unreadable (truncated? not a whole torch.save archive); resuming from "
            "step000004.ckpt instead") in caplog.messages


def test_no_readable_checkpoint_is_one_error_naming_each(make_cfg):
    cfg = make_cfg("stage=sft", "resume=auto")
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    (checkpoints / "step000002.ckpt").write_bytes(b"")
    os.utime(checkpoints / "step000002.ckpt", (1, 1))
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(cfg)
    assert str(error.value) == (f"resume=auto: no readable checkpoint in {checkpoints} (last.ckpt: truncated? not a "
                                "whole torch.save archive; step000002.ckpt: an empty file); pass ckpt_path=<a good "
                                "checkpoint>, or move the directory away to start fresh")


def test_ckpt_path_to_something_else_is_one_error(make_cfg, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, weights)
    with pytest.raises(ConfigError) as error:
        resolve_checkpoint(make_cfg("stage=sft", f"ckpt_path={notes}"))
    assert str(error.value) == (f"ckpt_path={notes}: cannot resume from {notes} (truncated? not a whole torch.save "
                                "archive); pass a checkpoint a run wrote (<run dir>/checkpoints/*.ckpt), or ckpt_path=last")
    assert checkpoint_problem(weights) == "a torch file, not a Lightning checkpoint: no state_dict in it"
    with pytest.raises(ConfigError, match=r"weights.pt \(a torch file, not a Lightning checkpoint"):
        train(make_cfg("stage=sft", f"ckpt_path={weights}"))
    assert _status(tmp_path / "run")["status"] == "failed"


@pytest.mark.slow
def test_a_real_run_resumes_past_its_truncated_last_ckpt(make_cfg, tmp_path, caplog):
    """4 steps with checkpoints at 2 (periodic, then overwritten) and the best at step 2 or 4; last.ckpt cut
    short: resume=auto continues from the readable one, to 6 steps, and the bar says where it resumed."""
    run = [*TINY_SFT, "callbacks=default", "callbacks.generation_samples=null", "callbacks.export_hf=null",
           "trainer.val_check_interval=2", "callbacks.periodic_checkpoint.every_n_train_steps=2"]
    assert train(make_cfg(*run, "trainer.max_steps=4"))["steps"] == 4
    checkpoints = tmp_path / "run" / "checkpoints"
    best = next(p for p in checkpoints.glob("step*.ckpt"))
    best_step = torch.load(best, weights_only=True)["global_step"]
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.INFO):
        metrics = train(make_cfg(*run, "trainer.max_steps=6", "resume=auto"))
    assert metrics["steps"] == 6
    assert f"resuming from {best.name} instead" in caplog.text
    assert f"resumed at step {best_step}/6" in caplog.messages
    assert _status(tmp_path / "run")["status"] == "completed" and _status(tmp_path / "run")["steps"] == 6


# --- status.yaml -----------------------------------------------------------------------------------

def test_status_records_completed_and_failed(make_cfg, tmp_path):
    metrics = train(make_cfg(*TINY_SFT, "trainer.max_steps=2"))
    status = _status(tmp_path / "run")
    assert metrics["steps"] == 2
    assert status["status"] == "completed" and status["message"] == "2 steps" and status["steps"] == 2
    assert status["time"].endswith("+00:00")

    with pytest.raises(ConfigError) as error:
        train(make_cfg(*TINY_SFT, "resume=sometimes"))
    status = _status(tmp_path / "run")
    assert status["status"] == "failed" and status["error"] == "ConfigError"
    assert status["message"] == str(error.value) == "resume=sometimes: expected auto or null"
    assert not list((tmp_path / "run").glob(".status.yaml.tmp-*"))


class _Sigterm(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the run after this step


def test_status_records_an_interruption(make_cfg, tmp_path):
    cfg = make_cfg(*TINY_SFT, "trainer.max_steps=4", f"+callbacks.stop._target_={__name__}._Sigterm",
                   "+callbacks.save_on_signal._target_=callbacks.preemption.SaveOnSignal",
                   f"+callbacks.save_on_signal.dirpath={tmp_path}/run/checkpoints")
    with pytest.raises(TrainingInterrupted):
        train(cfg)
    status = _status(tmp_path / "run")
    assert status["status"] == "interrupted" and status["message"].startswith("stopped by a signal at step 1;")


@pytest.mark.slow
def test_cli_failure_leaves_status_failed(tmp_path, demo_dir):
    run_dir = tmp_path / "run"
    done = _cli(tmp_path, "stage=sft", "logger=none", f"paths.data_dir={demo_dir.parent}", *TEST_MODEL,
                "resume=sometimes", f"hydra.run.dir={run_dir}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: ")
    status = _status(run_dir)
    assert status["status"] == "failed" and status["message"] == done.stderr.strip().splitlines()[-1][len("error: "):]


# --- one unit for progress -------------------------------------------------------------------------

class _BarProbe(L.Callback):
    """What the step bar shows after each training batch: (completed, total, description)."""

    made: list = []  # every probe a run built, newest last

    def __init__(self):
        self.seen = []
        _BarProbe.made.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar))
        task = bar.progress.tasks[bar.train_progress_bar_id]
        self.seen.append((int(task.completed), int(task.total), task.description.strip()))


def _with_bar(*overrides: str) -> list[str]:
    return [*overrides, "trainer.enable_progress_bar=true", "+callbacks.progress_bar._target_=callbacks.progress.step_progress_bar",
            f"+callbacks.probe._target_={__name__}._BarProbe"]


def test_the_bar_counts_optimiser_steps_of_max_steps(make_cfg):
    train(make_cfg(*_with_bar(*TINY_SFT, "trainer.max_steps=3")))
    assert _BarProbe.made[-1].seen == [(1, 3, "step"), (2, 3, "step"), (3, 3, "step")]


@pytest.mark.slow
def test_the_ppo_bar_counts_optimiser_steps_not_iterations(make_cfg):
    """batch 4, mini-batches of 2, 2 epochs: 4 optimiser steps per iteration; max_steps=8 is 2 iterations."""
    train(make_cfg(*_with_bar(*PPO, "trainer.max_steps=8")))
    assert _BarProbe.made[-1].seen == [(4, 8, "step"), (8, 8, "step")]


def test_the_bar_is_left_out_where_the_trainer_has_none(make_cfg):
    from callbacks.progress import step_progress_bar

    assert step_progress_bar(enabled=False) is None and isinstance(step_progress_bar(), StepProgressBar)
    cfg = make_cfg("stage=sft", "callbacks=default")  # trainer.enable_progress_bar=false (quiet)
    assert cfg.callbacks.progress_bar.enabled is False


# --- the timed checkpoint --------------------------------------------------------------------------

def test_timed_checkpoint_writes_last_ckpt_when_due(make_cfg, tmp_path):
    cfg = make_cfg(*TINY_SFT, "trainer.max_steps=3", "+callbacks.timed._target_=callbacks.timed_checkpoint.TimedCheckpoint",
                   f"+callbacks.timed.dirpath={tmp_path}/run/checkpoints", "+callbacks.timed.every_minutes=1e-9")
    train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_timed_checkpoint_settings(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg("stage=sft", "callbacks=default")
    assert cfg.callbacks.timed_checkpoint.every_minutes == 30
    clock = [1000.0]
    monkeypatch.setattr("callbacks.timed_checkpoint.time.monotonic", lambda: clock[0])
    saved = []

    class Trainer:
        global_step = 7
        strategy = type("S", (), {"broadcast": staticmethod(lambda x: x)})()

        def save_checkpoint(self, path):
            saved.append((self.global_step, Path(path).name))

    timed = TimedCheckpoint(str(tmp_path), every_minutes=30)
    timed.on_train_start(Trainer(), None)
    for minutes in (29, 31, 45, 62):
        clock[0] = 1000.0 + 60 * minutes
        timed.on_train_batch_end(Trainer(), None, None, None, 0)
    assert saved == [(7, "last.ckpt"), (7, "last.ckpt")]  # at 31 and 62 minutes
    off = TimedCheckpoint(str(tmp_path), every_minutes=None)
    off.on_train_batch_end(Trainer(), None, None, None, 0)
    assert len(saved) == 2
    with pytest.raises(ConfigError, match=r"^callbacks.timed_checkpoint.every_minutes=0: expected a number of minutes > 0"):
        train(make_cfg(*TINY_SFT, "callbacks=default", "callbacks.timed_checkpoint.every_minutes=0"))
