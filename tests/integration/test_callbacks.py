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
    train(make_cfg("stage=rm", "callbacks=default", "trainer.max_steps=2", "export.enabled=false", output_dir=out))
    assert not (out / "samples.jsonl").exists()


def test_export_hf_every_n_steps_keeps_the_newest(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_stages.train import train

    out = tmp_path / "exp"
    train(make_cfg("stage=sft", "callbacks=default", "callbacks.generation_samples=null", "trainer.max_steps=6",
                   "callbacks.export_hf.every_n_steps=2", "callbacks.export_hf.keep=2", output_dir=out))
    kept = sorted(p.name for p in (out / "exports").iterdir())
    assert kept == ["step_000004", "step_000006"]  # step 2 was removed to keep the newest two
    reloaded = AutoModelForCausalLM.from_pretrained(out / "exports" / "step_000006" / "export")
    final = AutoModelForCausalLM.from_pretrained(out / "export")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), final.state_dict().values()))


def test_ppo_export_hf_every_n_steps_counts_optimiser_steps(make_cfg, tmp_path):
    from llm_stages.train import train

    out = tmp_path / "ppo"
    # 4 replies / minibatch 2 x 2 epochs = 4 optimiser steps per iteration; exports after passing 6 and 12
    train(make_cfg("stage=ppo", "callbacks=default", "callbacks.generation_samples=null", "trainer.max_steps=12",
                   "+rollout.rewards.eq={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, _partial_: true}}",
                   "module.mini_batch_size=2", "module.ppo_epochs=2", "datamodule.batch_size=4",
                   "rollout.generation.max_new_tokens=6", "module.export_critic=true", "trainer.limit_val_batches=1",
                   "datamodule.val_batch_size=4", "callbacks.export_hf.every_n_steps=6", "callbacks.export_hf.keep=null",
                   output_dir=out))
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step_000008", "step_000012"]
    assert (out / "exports" / "step_000012" / "critic_export" / "config.json").is_file()


def test_throughput_mfu_with_a_given_peak(make_cfg, tmp_path):
    from callbacks.throughput import ThroughputMonitor
    from llm_stages.training.perf import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("cpu") is None
    module, datamodule = build(make_cfg("stage=sft"))
    monitor = ThroughputMonitor(peak_tflops=1e-3)  # 1 GFLOP/s: a made-up peak so the CPU run reports an MFU
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")})

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=[monitor, Capture()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    n_params = sum(p.numel() for p in module.model.parameters())
    assert seen["perf/mfu"] == pytest.approx(6 * n_params * seen["perf/tokens_per_s"] / 1e9, rel=1e-3)


def test_during_training_the_policy_is_in_train_mode_and_the_frozen_reference_in_eval_mode(make_cfg):
    """What lets train.py silence Lightning's "modules in eval mode at the start of training" warning:
    the frozen models are in eval mode on purpose, and what is trained is in train mode."""
    module, datamodule = build(make_cfg("stage=dpo"))
    module.model.eval()  # as from_pretrained leaves it
    modes = []
    module.on_train_batch_start = lambda batch, idx: modes.append(
        (module.model.training, all(m.training for m in module.model.modules()),
         [m.training for m in module.modules() if m not in set(module.model.modules())]))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    [(policy, every_policy_module, others)] = modes
    assert policy and every_policy_module
    assert others and not any(others[1:])  # the reference model (after the module itself), frozen in eval mode
