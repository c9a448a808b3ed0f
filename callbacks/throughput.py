"""Tokens/s and samples/s of training, measured over each optimiser step, MFU on GPUs, and peak memory."""

from __future__ import annotations

import time

import lightning as L
import torch

from llm_stages.training.perf import mfu, peak_memory_gb, peak_tflops


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s and perf/samples_per_s (all ranks together) and, on a GPU with a known
    (or given) bf16 peak, perf/mfu: model FLOPs utilisation per device (llm_stages.training.perf.mfu).
    Every stage, RL included: the peak memory so far (see llm_stages.training.perf.peak_memory_gb)."""

    def __init__(self, peak_tflops: float | None = None):
        self.peak = peak_tflops
        self._started = None
        self._params = 0

    def on_fit_start(self, trainer, pl_module):
        if self.peak is None and pl_module.device.type == "cuda":
            self.peak = peak_tflops(torch.cuda.get_device_name(pl_module.device))
        self._params = sum(p.numel() for p in pl_module.model.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        for name, value in peak_memory_gb(trainer).items():
            pl_module.log(name, value)
        micro_batches = batch if isinstance(batch, list) else [batch]
        if not all(hasattr(mb, "num_tokens") for mb in micro_batches):
            return  # RL prompt batches: the RL stages log their own rollout and update throughput
        tokens = sum(mb.num_tokens for mb in micro_batches)
        samples = sum(mb.input_ids.shape[0] for mb in micro_batches)
        pl_module.log("perf/tokens_per_s", tokens * trainer.world_size / seconds)
        pl_module.log("perf/samples_per_s", samples * trainer.world_size / seconds)
        if self.peak:
            pl_module.log("perf/mfu", mfu(self._params, tokens / seconds, self.peak))
