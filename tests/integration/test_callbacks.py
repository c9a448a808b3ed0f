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


def test_generation_samples_are_written_during_and_after_training(make_cfg, tmp_path):
    import json

    from llm_stages.train import train

    out = tmp_path / "gen"
    train(make_cfg("stage=sft", "callbacks=default", "trainer.max_steps=4", "trainer.val_check_interval=2",
                   "callbacks.generation_samples.max_new_tokens=4", "logger=wandb", output_dir=out))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [2, 4] and len(rows) == 8
    assert all(isinstance(r["completion"], str) for r in rows)
    assert len(list((out / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))) == 2


def test_generation_samples_skip_reward_models(make_cfg, tmp_path):
    from llm_stages.train import train

    out = tmp_path / "rm"
    train(make_cfg("stage=rm", "callbacks=default", "trainer.max_steps=2", "export=false", output_dir=out))
    assert not (out / "samples.jsonl").exists()
