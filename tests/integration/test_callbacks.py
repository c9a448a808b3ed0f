"""Callbacks shipped in the top-level `callbacks` package."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.nan_guard import NaNGuard
from llm_stages.errors import TrainingDivergedError
from llm_stages.train import build


def test_nan_guard_stops_before_the_bad_update_and_names_step_and_stage(make_cfg, tmp_path):
    module, datamodule = build(make_cfg("stage=sft", "optim.max_grad_norm=null"))
    real_loss_sum = module.loss_sum

    def loss_sum(batch):  # the loss turns NaN from the third optimiser step on
        loss, stats = real_loss_sum(batch)
        return (loss * float("nan") if module.trainer.global_step >= 2 else loss), stats

    module.loss_sum = loss_sum
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, callbacks=[NaNGuard(stage="sft"), checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0)
    snapshots = []
    module.on_train_batch_start = lambda batch, idx: snapshots.append(
        {n: p.detach().clone() for n, p in module.named_parameters()})
    with pytest.raises(TrainingDivergedError, match=r"step 2 of stage sft.*Last checkpoint: .*last\.ckpt"):
        trainer.fit(module, datamodule=datamodule)
    for name, p in module.named_parameters():  # still the weights from before the NaN step
        assert torch.equal(p.detach(), snapshots[-1][name])
        assert torch.isfinite(p).all()
