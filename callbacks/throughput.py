"""Tokens/s and samples/s of training, measured over each optimiser step."""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    def __init__(self):
        self._started = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        micro_batches = batch if isinstance(batch, list) else [batch]
        if not all(hasattr(mb, "num_tokens") for mb in micro_batches):
            return  # RL prompt batches: the RL stages log their own rollout and update throughput
        tokens = sum(mb.num_tokens for mb in micro_batches)
        samples = sum(mb.input_ids.shape[0] for mb in micro_batches)
        pl_module.log("perf/tokens_per_s", tokens * trainer.world_size / seconds)
        pl_module.log("perf/samples_per_s", samples * trainer.world_size / seconds)
