"""Performance measures shared by the throughput callback, train() and the benchmark: peak memory,
the GPU peak it is compared with, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak of one device, TFLOP/s (vendor figures, no sparsity), matched against the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def mfu(params: int, tokens_per_s: float, peak_tflops: float, flops_per_param_token: float = 6) -> float:
    """Model FLOPs utilisation: flops_per_param_token x parameters x tokens/s / peak. 6 is the PaLM
    estimate of a training step (forward 2, backward 4); attention FLOPs are left out, so short
    sequences are barely affected."""
    return flops_per_param_token * params * tokens_per_s / (peak_tflops * 1e12)


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
