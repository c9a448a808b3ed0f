"""last.ckpt every N minutes of training, so a killed long run loses at most that much, however
long its steps take. (Lightning's ModelCheckpoint(train_time_interval=...) does not save under
manual optimisation, which every stage here uses.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from llm_stages.errors import ConfigError

log = logging.getLogger(__name__)


class TimedCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` (atomically: llm_stages.training.run_dir.AtomicCheckpointIO)
    after the first optimiser step that ends `every_minutes` or more after the previous save (or the
    start). `every_minutes: null` turns it off."""

    def __init__(self, dirpath: str, every_minutes: float | None = 30):
        if every_minutes is not None and every_minutes <= 0:
            raise ConfigError(f"callbacks.timed_checkpoint.every_minutes={every_minutes}: expected a number of "
                              "minutes > 0, or null to turn the timed checkpoint off")
        self.dirpath = Path(dirpath)
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self._last = time.monotonic()
        self.saves = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_seconds is None:
            return
        due = time.monotonic() - self._last >= self.every_seconds
        # Rank 0's clock decides for all: every rank must take part in writing a sharded checkpoint.
        if not trainer.strategy.broadcast(due):
            return
        trainer.save_checkpoint(self.dirpath / "last.ckpt")
        self._last = time.monotonic()
        self.saves += 1
        log.info("timed checkpoint at step %d: %s", trainer.global_step, self.dirpath / "last.ckpt")
