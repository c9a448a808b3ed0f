"""A killed or signalled run resumes to the same weights as one that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TEST_MODEL

pytestmark = pytest.mark.slow

STEPS = 120
COMMON = ["stage=sft", *TEST_MODEL, "logger=csv", "callbacks.generation_samples=null", f"trainer.max_steps={STEPS}",
          "trainer.val_check_interval=40", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "datamodule.batch_size=4", "callbacks.periodic_checkpoint.every_n_train_steps=10"]


def _start(run_dir: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_stages", *COMMON, f"hydra.run.dir={run_dir}", *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out + err


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("ref")
    code, log = _finish(_start(cwd / "run", cwd))
    assert code == 0, log[-3000:]
    return _weights(cwd / "run")


def _wait_for_step(run_dir: Path, process: subprocess.Popen, step: int) -> None:
    """Until the run has logged a training row at `step` or later (the CSV logger writes rows as they come)."""
    metrics, deadline = run_dir / "csv" / "metrics.csv", time.time() + 300
    while process.poll() is None and time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines:
            column = lines[0].split(",").index("step")
            if any(len(cells) == len(lines[0].split(",")) and cells[column].isdigit() and int(cells[column]) >= step
                   for cells in (line.split(",") for line in lines[1:])):
                return
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_bit_exact(tmp_path, uninterrupted, how):
    """Interrupted after step 15, before the first validation (step 40): SIGTERM writes last.ckpt at
    the step it stops at; after kill -9 the periodic checkpoint of step 10 (or 20, 30) is the newest state."""
    run_dir = tmp_path / "run"
    process = _start(run_dir, tmp_path)
    _wait_for_step(run_dir, process, 14)  # logged steps count from 0
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(how)
    code, log = _finish(process)
    if how == signal.SIGTERM:
        assert code == 143 and "interrupted: stopped by a signal at step" in log, log[-3000:]
    assert not (run_dir / "export").exists()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"], checkpoints  # no best-by-val/loss checkpoint: no validation has run
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 15 <= step < 40 if how == signal.SIGTERM else step in (10, 20, 30), step

    code, log = _finish(_start(run_dir, tmp_path, "resume=auto"))
    assert code == 0, log[-3000:]
    assert "resume=auto: resuming from" in log
    resumed = _weights(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed), "resumed weights differ"
