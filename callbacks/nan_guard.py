"""Stop a run whose loss or gradients stop being finite, before the bad update is applied."""

from __future__ import annotations

import lightning as L
import torch

from llm_stages.errors import TrainingDivergedError


class NaNGuard(L.Callback):
    """Checks the gradients just before each optimiser step. A NaN/inf gradient (from a NaN/inf
    loss, or an overflow) stops the run with a message naming the step and stage; the weights are
    never updated with it, so the last checkpoint and the model stay good."""

    def __init__(self, stage: str = "?"):
        self.stage = stage

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = [name for name, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            # Any checkpoint callback's (the periodic one may have saved before the first validation).
            ckpt = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "none saved yet")
            raise TrainingDivergedError(
                f"non-finite gradients at step {trainer.global_step} of stage {self.stage} (first: {bad[0]}; "
                f"{len(bad)} tensors); the update was not applied. Last checkpoint: {ckpt}. Lower optim.lr, "
                f"check the data, or use trainer.precision=32.")
