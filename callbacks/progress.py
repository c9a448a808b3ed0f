"""Progress in one unit everywhere: optimiser steps of the configured total (`step 12/600`), which
is what `trainer.max_steps`, checkpoints, logs and a resumed run count. Lightning's own bar counts
batches of the current epoch under an `Epoch 0/-2` title (max_epochs=-1 minus one); an RL stage
takes several optimiser steps per batch, so its batches were never its steps."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

log = logging.getLogger(__name__)


def _total(trainer) -> float:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else float("inf")


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar with its training bar counting `trainer.global_step` of
    `trainer.max_steps` (a resumed run's bar starts where it resumed)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"  # padded as Lightning pads its own

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def _initialize_train_progress_bar_id(self) -> None:
        super()._initialize_train_progress_bar_id()
        self._show_steps(self.trainer)

    def _show_steps(self, trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, total=_total(trainer), completed=trainer.global_step)
            self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class ReportResume(L.Callback):
    """One log line where a resumed run continues, in the bar's unit: `resumed at step 40/600`
    (also where there is no bar, as in a batch job's log)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and trainer.is_global_zero:
            log.info("resumed at step %d/%s", trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else "?")


def step_progress_bar(enabled: bool = True) -> StepProgressBar | None:
    """The bar, or None where the trainer has no bar (`trainer.enable_progress_bar=false`): Lightning
    refuses a progress-bar callback then, and train() drops a None callback."""
    return StepProgressBar() if enabled else None
