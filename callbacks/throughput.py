"""Tokens/s and samples/s of training, measured over each optimiser step, and MFU on GPUs."""

from __future__ import annotations

import time

import lightning as L
import torch

# Dense bf16 peak of one device, TFLOP/s (vendor figures, no sparsity), matched against the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s and perf/samples_per_s (all ranks together) and, on a GPU with a known
    (or given) bf16 peak, perf/mfu: model FLOPs utilisation, 6 x parameters x tokens/s per device /
    peak (the PaLM estimate; attention FLOPs left out, so short sequences are barely affected)."""

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
        micro_batches = batch if isinstance(batch, list) else [batch]
        if not all(hasattr(mb, "num_tokens") for mb in micro_batches):
            return  # RL prompt batches: the RL stages log their own rollout and update throughput
        tokens = sum(mb.num_tokens for mb in micro_batches)
        samples = sum(mb.input_ids.shape[0] for mb in micro_batches)
        pl_module.log("perf/tokens_per_s", tokens * trainer.world_size / seconds)
        pl_module.log("perf/samples_per_s", samples * trainer.world_size / seconds)
        if self.peak:
            pl_module.log("perf/mfu", 6 * self._params * tokens / seconds / (self.peak * 1e12))
