"""Data parallelism is exact: two CPU processes (`trainer=ddp`, gloo) with batch_size B follow the
same loss trajectory as one process with batch_size 2B. This needs the sampler to give a step the
same global batch whatever the world size (see ResumableBatchSampler) and the loss to be the
all-ranks token (or pair) mean (see Stage.accumulated_step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from llm_stages.train import build
from tests.conftest import QUIET, REPO, TEST_MODEL

STEPS = 5
COMMON = [f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
          "+trainer.enable_checkpointing=false", "optim.warmup_steps=0", "optim.lr=1e-3"]
STAGES = {"sft": ["stage=sft"], "dpo": ["stage=dpo"]}


class LossRecorder(L.Callback):
    """train/loss of every step, written at the end to one file per rank (two ranks printing to
    one pipe can interleave a line)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.losses = Path(out_dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


def fit_and_record(cfg, out_dir: str) -> None:
    """Fit with the trainer the config names (cpu or ddp), recording each rank's losses."""
    module, datamodule = build(cfg)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[LossRecorder(out_dir)])
    trainer.fit(module, datamodule=datamodule)


# Lightning's DDP launcher re-runs this script once more per extra rank, with the same arguments.
DDP_SCRIPT = """
import sys
from llm_stages.config import compose
from tests.e2e.test_ddp import fit_and_record
fit_and_record(compose(sys.argv[2:], output_dir=sys.argv[1]), sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_ranks_follow_the_single_process_doubled_batch(make_cfg, tmp_path, demo_dir, stage):
    per_rank = 4
    ddp_out = tmp_path / "ddp"
    overrides = [*STAGES[stage], *COMMON, "trainer=ddp", f"datamodule.batch_size={per_rank}", *TEST_MODEL, *QUIET,
                 f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp_path}/runs"]
    script = tmp_path / "ddp_losses.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(ddp_out), *overrides], capture_output=True, text=True,
                         cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = [json.loads((ddp_out / f"losses_rank{r}.json").read_text()) for r in (0, 1)]

    single_out = tmp_path / "single"
    fit_and_record(make_cfg(*STAGES[stage], *COMMON, f"datamodule.batch_size={2 * per_rank}"), str(single_out))
    single = json.loads((single_out / "losses_rank0.json").read_text())

    assert len(single) == STEPS and ranks[0] == ranks[1]  # the logged loss is already reduced over ranks
    assert ranks[0] == pytest.approx(single, rel=1e-4), (ranks[0], single)
    assert len(set(single)) == STEPS  # the trajectory moves: a real comparison, not one repeated number
