"""AdamW with warm-up and a decay schedule, built from the `optim` config group: torch's AdamW
(`optim=adamw`), or bitsandbytes' 8-bit AdamW (`optim=adamw8bit`: both moments stored in 8 bits,
blockwise quantised, 2 bytes per parameter instead of 8) and its paged variant
(`optim=paged_adamw8bit`: the state in CUDA unified memory, moved to CPU when the GPU runs short)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_stages.errors import ConfigError


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    # One fused kernel for the whole update instead of a loop over tensors (11-15% of a CPU step for a
    # 135M model); the same arithmetic up to rounding. TRL's default too (adamw_torch_fused).
    fused: bool = True


SCHEDULES = {
    "cosine": lambda progress, floor: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress, floor: floor + (1 - floor) * (1 - progress),
    "constant": lambda progress, floor: 1.0,
}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, scheduler: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up to 1, then decay
    to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return SCHEDULES[scheduler](progress, min_lr_ratio)


def bitsandbytes_adamw(name: str, params: list[torch.Tensor]):
    """bitsandbytes' class for `optim=<name>`, or one ConfigError saying why it cannot run here."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optim={name} needs the bitsandbytes package, which is not installed: "
                          "`pip install bitsandbytes`, or use optim=adamw") from None
    if name == "paged_adamw8bit" and not all(p.is_cuda for p in params):
        # bitsandbytes would fall back to the unpaged optimizer with a warning: say so instead.
        raise ConfigError("optim=paged_adamw8bit pages optimizer state between GPU and CPU memory, which needs the "
                          "parameters on a CUDA GPU (trainer=gpu); on CPU use optim=adamw8bit")
    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {list(OPTIMIZERS)}, got {cfg.name!r}")
    if cfg.scheduler not in SCHEDULES:
        raise ConfigError(f"optim.scheduler must be one of {sorted(SCHEDULES)}, got {cfg.scheduler!r}")
    # Biases and norm weights (1-D tensors) are not decayed, as in every mainstream recipe.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      fused=True if cfg.fused else None)
    else:
        optimizer = bitsandbytes_adamw(cfg.name, [p for g in groups for p in g["params"]])(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, scheduler=cfg.scheduler,
        min_lr_ratio=cfg.min_lr_ratio))
    return optimizer, scheduler
