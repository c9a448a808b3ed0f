"""Tokens/s and samples/s of training, measured over each optimiser step, MFU on GPUs, and peak memory."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

# Dense bf16 peak of one device, TFLOP/s (vendor figures, no sparsity), matched against the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def peak_memory_gb(trainer) -> dict[str, float]:
    """Peak memory so far, in GiB, the max over ranks (the rank that runs out first is the one that
    matters): `perf/peak_rss_gb`, the process's peak resident set (CPU tensors, libraries, the CUDA
    context), and on CUDA `perf/cuda_max_allocated_gb`, the peak of memory held by tensors (what
    batch size, precision and gradient checkpointing change). A collective: call it on every rank."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peak = {"perf/peak_rss_gb": rss_bytes / 2**30}
    device = trainer.strategy.root_device
    if device.type == "cuda":
        peak["perf/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {k: float(trainer.strategy.reduce(torch.tensor(v, dtype=torch.float64, device=device), reduce_op="max"))
            for k, v in peak.items()}


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s and perf/samples_per_s (all ranks together) and, on a GPU with a known
    (or given) bf16 peak, perf/mfu: model FLOPs utilisation, 6 x parameters x tokens/s per device /
    peak (the PaLM estimate; attention FLOPs left out, so short sequences are barely affected).
    Every stage, RL included: the peak memory so far (see peak_memory_gb)."""

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
            pl_module.log("perf/mfu", 6 * self._params * tokens / seconds / (self.peak * 1e12))
