"""A killed or signalled run resumes to the same weights as one that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_bit_exact(tmp_path, uninterrupted, how):
    run_dir = tmp_path / "run"
    process = _start(run_dir, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:  # mid-epoch, after a checkpoint
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.3)  # a few steps past the periodic checkpoint
    process.send_signal(how)
    code, log = _finish(process)
    if how == signal.SIGTERM:
        assert code == 143 and "interrupted: stopped by a signal at step" in log, log[-3000:]
    assert not (run_dir / "export").exists()

    code, log = _finish(_start(run_dir, tmp_path, "resume=auto"))
    assert code == 0, log[-3000:]
    assert "resume=auto: resuming from" in log
    resumed = _weights(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed), "resumed weights differ"


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(tmp_path):
    code, log = _finish(_start(tmp_path / "empty", tmp_path, "ckpt_path=last"))
    assert code == 2 and "ckpt_path=last: no checkpoint at" in log
