"""A key given on the command line reaches no file of the run: not Hydra's .hydra/, not the logged
config, not the W&B offline run that `wandb sync` would upload."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llm_stages.training.redact import scrub, secret_values
from tests.conftest import REPO, TEST_MODEL

HF_KEY = "hf_" + "q" * 10 + "Zx81" * 5       # the shape of a Hugging Face token
PASSWORD = "correct-horse-battery-staple"     # no telltale shape: found by its key's name


def test_secrets_found_by_key_name_and_shape_are_scrubbed_inside_strings():
    overrides = [f"+logger_secret.api_key={HF_KEY}", f"+db.password='{PASSWORD}'", "optim.lr=1e-3",
                 "+wandb_key_source=${oc.env:WANDB_API_KEY}"]
    assert secret_values({}, overrides) == {HF_KEY, PASSWORD}
    hydra = {"overrides": {"task": overrides}, "job": {"override_dirname": ",".join(overrides)},
             "env": {"HF_TOKEN": HF_KEY, "TOKENIZERS_PARALLELISM": "false"}}
    scrubbed = scrub(hydra, secret_values(hydra, overrides))
    assert scrubbed["overrides"]["task"] == ["+logger_secret.api_key=***", "+db.password='***'", "optim.lr=1e-3",
                                             "+wandb_key_source=${oc.env:WANDB_API_KEY}"]
    assert HF_KEY not in str(scrubbed) and PASSWORD not in str(scrubbed)
    assert scrubbed["env"] == {"HF_TOKEN": "***", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_a_planted_secret_is_nowhere_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "llm_stages", "stage=sft", *TEST_MODEL, "logger=[csv,wandb]", "trainer.max_steps=3",
               "callbacks.generation_samples=null", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
               f"+logger_secret.api_key={HF_KEY}", f"+db.password={PASSWORD}"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    # Where the config lands: Hydra's files, the CSV logger's hparams and W&B's offline run.
    names = {p.name for p in files}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml", "hparams.yaml"} <= names
    assert any(p.suffix == ".wandb" for p in files)
    leaks = [str(p) for p in files for secret in (HF_KEY, PASSWORD) if secret.encode() in p.read_bytes()]
    assert leaks == []
    assert "+logger_secret.api_key=***" in (run_dir / ".hydra" / "overrides.yaml").read_text()
