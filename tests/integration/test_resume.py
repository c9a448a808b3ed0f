"""Nothing lost: interrupted runs (in-process, so fast) resume from their newest state to the weights of
an uninterrupted run, with their metric history and W&B run, and leave nothing behind. The same with
real signals and kill -9 across processes: test_fault_tolerance.py."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
from safetensors.torch import load_file

from llm_stages.config import compose
from llm_stages.errors import TrainingInterrupted
from llm_stages.training.run_dir import resolve_checkpoint
from llm_stages.train import train
from tests.conftest import TEST_MODEL

STEPS = 12
RUN = ["stage=sft", *TEST_MODEL, "callbacks=default", "callbacks.generation_samples=null", "logger=csv",
       f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "datamodule.batch_size=4",
       "callbacks.periodic_checkpoint.every_n_train_steps=4"]


class Killed(BaseException):
    """What kill -9 leaves on disk, in-process: Lightning writes no checkpoint for it."""


class Interrupt(L.Callback):
    """After optimiser step `step`: SIGTERM to this process (`how="sigterm"`) or a kill."""

    def __init__(self, step: int, how: str = "kill"):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the run after this step
            else:
                raise Killed


def _cfg(run_dir: Path, demo_dir: Path, *extra: str):
    return compose([f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={run_dir.parent}/runs", *RUN, *extra],
                   output_dir=str(run_dir))


def _interrupted(run_dir: Path, demo_dir: Path, step: int, how: str, *extra: str) -> None:
    cfg = _cfg(run_dir, demo_dir, f"+callbacks.interrupt._target_={__name__}.Interrupt",
               f"+callbacks.interrupt.step={step}", f"+callbacks.interrupt.how={how}", *extra)
    with pytest.raises(TrainingInterrupted if how == "sigterm" else Killed):
        train(cfg)
    if wandb.run is not None:
        wandb.finish(exit_code=1)  # what the end of the killed process does


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def _same_weights(run_dir: Path, reference: dict) -> bool:
    weights = load_file(run_dir / "export" / "model.safetensors")
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def _train_rows(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dir) -> dict:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train(_cfg(run_dir, demo_dir))["steps"] == STEPS
    assert _train_rows(run_dir) == list(range(STEPS))
    return load_file(run_dir / "export" / "model.safetensors")


def test_kill_before_the_first_validation_resumes_from_the_periodic_checkpoint(tmp_path, demo_dir, uninterrupted):
    run_dir = tmp_path / "run"
    _interrupted(run_dir, demo_dir, 5, "kill")  # one step past the periodic checkpoint at 4; validation is at 10
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"] and _step(checkpoints / "last.ckpt") == 4

    # A kill during an export or a checkpoint write leaves temporaries; the next start removes a dead
    # writer's, and leaves a live process's alone.
    dead, live = _dead_pid(), os.getppid()
    leftovers = [run_dir / f".export.tmp-{dead}", run_dir / f".export.old-{dead}",
                 run_dir / "exports" / "step_000004" / f".export.tmp-{dead}"]
    for directory in leftovers:
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"half")
    (checkpoints / f".last.ckpt.tmp-{dead}").write_bytes(b"half")
    (run_dir / f".export.tmp-{live}").mkdir()

    metrics = train(_cfg(run_dir, demo_dir, "resume=auto"))
    assert metrics["steps"] == STEPS and _same_weights(run_dir, uninterrupted)
    assert _train_rows(run_dir) == list(range(STEPS))  # rows before and after the kill, each step once
    assert not any(p.exists() for p in leftovers) and not (checkpoints / f".last.ckpt.tmp-{dead}").exists()
    assert (run_dir / f".export.tmp-{live}").exists()


def test_sigterm_before_the_first_checkpoint_then_a_kill_resume_to_the_newest_state(tmp_path, demo_dir, uninterrupted):
    """The sequence that left a stale last.ckpt beside last-v1.ckpt: SIGTERM before any checkpoint,
    resume, periodic checkpoints, a kill, resume with docs/runs.md's `ckpt_path=last`."""
    run_dir, loggers = tmp_path / "run", "logger=[csv,wandb]"
    checkpoints = run_dir / "checkpoints"
    _interrupted(run_dir, demo_dir, 2, "sigterm", loggers)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"] and _step(checkpoints / "last.ckpt") == 2

    _interrupted(run_dir, demo_dir, 9, "kill", loggers, "ckpt_path=last")  # periodic checkpoints at 4 and 8
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"] and _step(checkpoints / "last.ckpt") == 8
    newest = str(checkpoints / "last.ckpt")
    assert resolve_checkpoint(_cfg(run_dir, demo_dir, "ckpt_path=last")) == newest
    assert resolve_checkpoint(_cfg(run_dir, demo_dir, "resume=auto")) == newest

    metrics = train(_cfg(run_dir, demo_dir, loggers, "ckpt_path=last"))
    assert metrics["steps"] == STEPS and _same_weights(run_dir, uninterrupted)
    assert _train_rows(run_dir) == list(range(STEPS))
    # One W&B run, continued twice: three offline records of the same run id.
    # offline-run-<date>_<time>-<id>, and W&B appends "-1" to a directory name taken in the same second
    run_ids = [re.match(r"offline-run-\d{8}_\d{6}-([^-]+)", p.name).group(1)
               for p in (run_dir / "wandb").glob("offline-run-*")]
    assert len(run_ids) == 3 and len(set(run_ids)) == 1, run_ids
