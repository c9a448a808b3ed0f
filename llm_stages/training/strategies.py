"""What each Lightning strategy asks of a stage, behind one small interface chosen once from the
trainer's strategy (`for_strategy`): shard the trained models, keep gradients local over the
micro-batches before the last, clip the gradient norm. Stage code calls these and never asks which
strategy it runs under; a stage states what it cannot run under (`Stage.fsdp1_unsupported`).

Full weights of a sharded model for an export are gathered by `sharding.full_state_dict`, which
reads them off the parameters themselves (DTensor, FSDP1 wrapper, DeepSpeed partition).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

from llm_stages.training import sharding
from llm_stages.errors import ConfigError


class Replicated:
    """One device or DDP: every rank holds every weight; DDP syncs gradients in backward."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def shard(self, stage) -> None:
        """Called from Lightning's `configure_model`: before the optimiser is built (so it holds the
        sharded parameters), on every fit and validate (so idempotent)."""

    def no_sync(self, stage):
        """Gradients of the micro-batches before the last stay on their rank, summed into .grad; the
        last backward communicates the total once."""
        block = getattr(self.strategy, "block_backward_sync", None)
        return block() if block else nullcontext()

    def clip(self, stage, optimizer, max_norm: float) -> None:
        if getattr(optimizer, "_step_supports_amp_scaling", False) and getattr(self.strategy.precision_plugin, "scaler", None) is None:
            # Lightning refuses to clip for optimizers that can unscale inside step() (fused AdamW)
            # under mixed precision, for fear of clipping scaled gradients; bf16 scales nothing.
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        stage.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


class FSDP2(Replicated):
    """`trainer=fsdp2` (Lightning's ModelParallelStrategy): each trained model sharded by `fully_shard`."""

    def shard(self, stage) -> None:
        if self.strategy.device_mesh["tensor_parallel"].size() > 1:
            raise ConfigError("trainer.strategy.tensor_parallel_size must be 1: the stages shard data-parallel "
                              "only (FSDP2); set data_parallel_size to the number of devices")
        # bf16-mixed: gather weights in bf16 (half the traffic); fp32 master weights and gradients stay sharded.
        param_dtype = torch.bfloat16 if stage.trainer.precision == "bf16-mixed" else None
        for model in trained_models(stage):
            sharding.shard_fsdp2(model, self.strategy.device_mesh["data_parallel"], param_dtype=param_dtype)

    def no_sync(self, stage):
        return sharding.fsdp2_no_sync(stage)


class FSDP1(Replicated):
    """`trainer=fsdp` (Lightning's FSDPStrategy): the policy wrapped with the strategy's settings."""

    def shard(self, stage) -> None:
        check_fsdp1(stage)
        stage.model = sharding.wrap_fsdp1(stage.model, self.strategy)

    def no_sync(self, stage):
        return stage.model.no_sync()

    def clip(self, stage, optimizer, max_norm: float) -> None:
        # Lightning refuses norm clipping under FSDP1: each rank holds only a shard of the flat
        # gradients, so the global norm needs the FSDP module's own method.
        stage.model.clip_grad_norm_(max_norm)


class DeepSpeed(Replicated):
    """`trainer=deepspeed` (ZeRO stage 2 or 3): DeepSpeed partitions and clips itself."""

    def shard(self, stage) -> None:
        if self.strategy.zero_stage_3:
            sharding.mark_sharded(stage.model)  # DeepSpeed partitions it later; generate must know now
        self.hand_over_clipping(stage.optim_cfg.max_grad_norm)

    def hand_over_clipping(self, max_grad_norm: float | None) -> None:
        """DeepSpeed clips gradients itself inside `engine.step()` (Lightning's clip_gradients is a no-op
        with it, and Trainer(gradient_clip_val) is refused under manual optimisation), so the clipping
        threshold goes into its config, from optim.max_grad_norm like every other strategy."""
        max_norm = float(max_grad_norm or 0.0)
        # 0 is also what Lightning fills in when the config has none (from Trainer(gradient_clip_val=None)).
        configured = float(self.strategy.config.get("gradient_clipping") or 0.0)
        if configured and configured != max_norm:
            raise ConfigError(f"the DeepSpeed config sets gradient_clipping={configured} but optim.max_grad_norm="
                              f"{max_grad_norm}: leave gradient_clipping out of the DeepSpeed config, "
                              "the stage sets it from optim.max_grad_norm")
        self.strategy.config["gradient_clipping"] = max_norm

    def no_sync(self, stage):
        return sharding.deepspeed_no_sync(self.strategy.model)

    def clip(self, stage, optimizer, max_norm: float) -> None:
        pass  # inside engine.step(), to the threshold hand_over_clipping gave it


def for_strategy(strategy: Strategy) -> Replicated:
    """The one place that asks which strategy a trainer runs."""
    if isinstance(strategy, ModelParallelStrategy):
        return FSDP2(strategy)
    if isinstance(strategy, FSDPStrategy):
        return FSDP1(strategy)
    if isinstance(strategy, DeepSpeedStrategy):
        return DeepSpeed(strategy)
    return Replicated(strategy)


def trained_models(stage) -> list[torch.nn.Module]:
    """Each separately sharded model: the policy, and for PPO the critic (`trainable()` is then a ModuleList)."""
    trainable = stage.trainable()
    return list(trainable) if isinstance(trainable, torch.nn.ModuleList) else [trainable]


def check_fsdp1(stage) -> None:
    """What FSDP1 (`trainer=fsdp`) cannot run: what the stage itself declares (a model is only
    gathered when its own forward is called; FSDP2 has no such limit), and an adapter model, which
    would be exported as the adapter alone."""
    if stage.fsdp1_unsupported:
        raise ConfigError(f"trainer=fsdp (FSDP1) cannot run {type(stage).__name__}: {stage.fsdp1_unsupported}; "
                          "use trainer=fsdp2")
    if hasattr(stage.model, "peft_config"):
        raise ConfigError("trainer=fsdp (FSDP1) does not support peft adapters (the export would hold the "
                          "adapter alone); use trainer=fsdp2 or ddp")
