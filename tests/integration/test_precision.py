"""Every stage trains under each `trainer.precision` with gradient accumulation (where a stage takes
it) and gradient clipping on: finite losses and finite, clipped updates, on CPU."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from llm_stages.train import build

ACCUM = ["datamodule.batch_size=2", "datamodule.grad_accum=2"]  # 2 micro-batches per optimiser step
RL = ["rollout.generation.max_new_tokens=8", "module.ppo_epochs=1"]
DIGIT_REWARD = ("{weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, "
                "pattern: '.*[0-9].*'}}")
# Two optimiser steps each. RL stages take one batch of prompts per rollout (grad_accum stays 1, by
# design): their accumulation is micro_batch_size < mini_batch_size, two micro-batches per step.
STAGES = {
    "pt": ["stage=pt", "datamodule.block_size=64", *ACCUM],
    "sft": ["stage=sft", *ACCUM],
    "rm": ["stage=rm", *ACCUM],
    "dpo": ["stage=dpo", *ACCUM],
    "ppo": ["stage=ppo", *RL, "datamodule.batch_size=4", "module.mini_batch_size=2", "module.micro_batch_size=1",
            f"+rollout.rewards.digit={DIGIT_REWARD}"],
    "grpo": ["stage=grpo", *RL, "datamodule.batch_size=2", "module.num_generations=4", "module.mini_batch_size=4",
             "module.micro_batch_size=2", f"+rollout.rewards.digit={DIGIT_REWARD}"],
}
PRECISIONS = {"32": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}  # -> weight dtype
MAX_GRAD_NORM = 0.01  # small enough that every step is clipped


class Check(L.Callback):
    """Per optimiser step: the weights' dtype, the (clipped) gradient norm, and the logged loss."""

    def __init__(self):
        self.dtypes, self.grad_norms, self.losses = set(), [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.dtypes |= {g.dtype for g in grads}
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


# bf16-true in the fast suite (it differs most from the fp32 the other tests run); the rest are slow.
@pytest.mark.parametrize("precision", ["bf16-true", *(pytest.param(p, marks=pytest.mark.slow) for p in ["32", "bf16-mixed"])])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_trains_at_every_precision_with_accumulation_and_clipping(make_cfg, stage, precision):
    cfg = make_cfg(*STAGES[stage], f"trainer.precision={precision}", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                   "+trainer.enable_checkpointing=false", f"optim.max_grad_norm={MAX_GRAD_NORM}", "optim.warmup_steps=0")
    module, datamodule = build(cfg)
    check = Check()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[check])
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 2
    assert check.losses and all(math.isfinite(loss) for loss in check.losses), check.losses
    assert check.dtypes == {PRECISIONS[precision]}
    # Clipped to the threshold (a bf16 norm is only good to ~3 significant digits). A GRPO minibatch
    # may hold only replies whose group scored alike: zero advantage, zero gradient, nothing to clip.
    assert len(check.grad_norms) == 2 and max(check.grad_norms) > 0
    assert all(norm == 0 or norm == pytest.approx(MAX_GRAD_NORM, rel=0.01) for norm in check.grad_norms), check.grad_norms
