"""What every stage shares: the HF model and tokenizer, the optimiser and schedule, and one
optimiser step over a list of micro-batches with exact loss weighting.

Accumulation is done here rather than by Lightning's `accumulate_grad_batches`, because the right
denominator of a token-mean loss is the token count of the *whole* accumulated batch (on all
ranks), which is only known once all its micro-batches are in hand.

Under sharded strategies (`trainer=fsdp2|fsdp|deepspeed_zero2|deepspeed_zero3`) the same loop runs;
`configure_model` shards the trainable models and the strategy-specific parts (skipping gradient
sync, clipping) are in `_no_grad_sync` and `_clip_gradients`.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from llm_stages import sharding
from llm_stages.data.collate import ResumableBatchSampler
from llm_stages.errors import ConfigError
from llm_stages.optim import OptimConfig, build_optimizer


class Stage(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer, optim: OptimConfig):
        super().__init__()
        self.model, self.tokenizer, self.optim_cfg = model, tokenizer, optim
        self.automatic_optimization = False
        # Checkpoints leave frozen weights out (see on_save_checkpoint), so loading is not strict.
        self.strict_loading = False

    # -- what a stage defines ------------------------------------------------------------------
    def loss_sum(self, micro_batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's summed loss (a tensor with grad) and summed stats to log."""
        raise NotImplementedError

    def loss_weight(self, micro_batch) -> torch.Tensor:
        """What the loss is a mean over (tokens, pairs, ...), counted in this micro-batch."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.model.train()  # Lightning leaves HF models in the eval mode they were loaded in

    def trainable(self) -> torch.nn.Module:
        """What the optimiser updates (the model; PPO adds its critic)."""
        return self.model

    def exports(self) -> dict[str, torch.nn.Module]:
        """Models saved as HF checkpoints at the end, by folder name under the run dir."""
        return {"export": self.model}

    def configure_model(self) -> None:
        """Lightning's hook for sharding, called with the strategy set up, before the optimiser is
        built (so it holds the sharded parameters), on every fit and validate (so idempotent)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            if strategy.device_mesh["tensor_parallel"].size() > 1:
                raise ConfigError("trainer.strategy.tensor_parallel_size must be 1: the stages shard data-parallel "
                                  "only (FSDP2); set data_parallel_size to the number of devices")
            # bf16-mixed: gather weights in bf16 (half the traffic); fp32 master weights and gradients stay sharded.
            param_dtype = torch.bfloat16 if self.trainer.precision == "bf16-mixed" else None
            for model in self._trainable_models():
                sharding.shard_fsdp2(model, strategy.device_mesh["data_parallel"], param_dtype=param_dtype)
        elif isinstance(strategy, FSDPStrategy):
            self._check_fsdp1()
            self.model = sharding.wrap_fsdp1(self.model, strategy)
        elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            sharding.mark_sharded(self.model)  # DeepSpeed partitions it later; generate must know now
        if isinstance(strategy, DeepSpeedStrategy):
            self._configure_deepspeed(strategy)

    def _trainable_models(self) -> list[torch.nn.Module]:
        """Each separately sharded model: the policy, and for PPO the critic (`trainable()` is then a ModuleList)."""
        trainable = self.trainable()
        return list(trainable) if isinstance(trainable, torch.nn.ModuleList) else [trainable]

    def _check_fsdp1(self) -> None:
        """What FSDP1 (`trainer=fsdp`) cannot run: a model is only gathered when its own forward is
        called, while the RL stages generate and call the critic's parts directly (FSDP2 handles
        both), and an adapter model would be exported as the adapter alone."""
        from llm_stages.stages.rl import RLStage  # rl imports this module

        if isinstance(self, RLStage):
            raise ConfigError(f"trainer=fsdp (FSDP1) cannot run {type(self).__name__}: the RL stages generate and call "
                              "model parts outside the sharded model's forward; use trainer=fsdp2")
        if hasattr(self.model, "peft_config"):
            raise ConfigError("trainer=fsdp (FSDP1) does not support peft adapters (the export would hold the "
                              "adapter alone); use trainer=fsdp2 or ddp")

    def _configure_deepspeed(self, strategy: DeepSpeedStrategy) -> None:
        """DeepSpeed clips gradients itself inside `engine.step()` (Lightning's clip_gradients is a no-op
        with it, and Trainer(gradient_clip_val) is refused under manual optimisation), so the clipping
        threshold goes into its config, from optim.max_grad_norm like every other strategy."""
        max_norm = float(self.optim_cfg.max_grad_norm or 0.0)
        # 0 is also what Lightning fills in when the config has none (from Trainer(gradient_clip_val=None)).
        configured = float(strategy.config.get("gradient_clipping") or 0.0)
        if configured and configured != max_norm:
            raise ConfigError(f"the DeepSpeed config sets gradient_clipping={configured} but optim.max_grad_norm="
                              f"{self.optim_cfg.max_grad_norm}: leave gradient_clipping out of the DeepSpeed config, "
                              "the stage sets it from optim.max_grad_norm")
        strategy.config["gradient_clipping"] = max_norm

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.trainable(), self.optim_cfg, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, micro_batches: list, batch_idx: int) -> torch.Tensor:
        loss, stats = self.optimizer_step(micro_batches, self.loss_sum, self.loss_weight)
        self._mark_batch_consumed()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        for k, v in stats.items():
            self.log(f"train/{k}", v)
        return loss

    def optimizer_step(self, micro_batches: list, loss_sum, loss_weight) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser (and schedule) step on the gradient of sum(loss_sum) / sum(loss_weight) over
        the micro-batches of all ranks. Returns that loss and each stat's sum / weight."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        weight = self._all_reduce(sum(loss_weight(mb) for mb in micro_batches).float()).clamp(min=1)
        world = self.trainer.world_size
        total = torch.zeros((), device=self.device)
        stats: dict[str, torch.Tensor] = {}
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self._no_grad_sync():
                micro_loss, micro_stats = loss_sum(micro_batch)
                # DDP averages gradients over ranks; multiplying by world turns that into the global sum / weight.
                self.manual_backward(micro_loss * world / weight)
            total += micro_loss.detach()
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0) + v.detach()
        if self.optim_cfg.max_grad_norm:
            self._clip_gradients(optimizer, self.optim_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return self._all_reduce(total) / weight, {k: self._all_reduce(v.float()) / weight for k, v in stats.items()}

    # A checkpoint holds what training changes. Frozen weights (a reference copy, a reward model, the
    # base under LoRA/QLoRA) come back from the config on resume: checkpoints stay small and 4-bit
    # tensors never need a round trip.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        quant_state = tuple(f"{name}." for name in frozen)  # bitsandbytes stores `<weight>.absmax` etc. beside a 4-bit weight
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k not in frozen and not k.startswith(quant_state)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:  # FSDP1 and DeepSpeed load the weights themselves
            return
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        missing = [name for name in trainable if name not in checkpoint["state_dict"]]
        if missing:
            raise ConfigError(f"the checkpoint lacks {len(missing)} trained weights of this model (e.g. {missing[0]}): "
                              "it was written by a run with another model, stage or peft config")

    # Validation metrics are sums over the whole validation set divided by its total weight
    # (tokens, pairs), on all ranks: not a mean of per-batch means.
    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_weight = torch.zeros((), device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._accumulate_val(*self.loss_sum(batch), self.loss_weight(batch))

    def _accumulate_val(self, loss_sum: torch.Tensor | None, stats: dict[str, torch.Tensor], weight) -> None:
        self._val_weight += weight
        for k, v in (({"loss": loss_sum} if loss_sum is not None else {}) | stats).items():
            self._val_sums[k] = self._val_sums.get(k, 0) + v.detach().float()

    def on_validation_epoch_end(self) -> None:
        weight = self._all_reduce(self._val_weight.float()).clamp(min=1)
        metrics = {f"val/{k}": (self._all_reduce(v) / weight).item() for k, v in self._val_sums.items()}
        metrics.update(self.derived_val_metrics(metrics))
        # Already reduced over ranks; sync_dist only averages equal values (and silences Lightning's warning).
        if "val/loss" in metrics:
            self.log("val/loss", metrics.pop("val/loss"), prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)

    def derived_val_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the aggregated ones (e.g. perplexity from loss)."""
        return {}

    def _no_grad_sync(self):
        """Gradients of the micro-batches before the last stay on their rank, summed into .grad; the
        last backward communicates the total once."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            return sharding.fsdp2_no_sync(self)
        if isinstance(strategy, FSDPStrategy):
            return self.model.no_sync()
        if isinstance(strategy, DeepSpeedStrategy):
            return sharding.deepspeed_no_sync(strategy.model)
        block = getattr(strategy, "block_backward_sync", None)
        return block() if block else nullcontext()

    def _clip_gradients(self, optimizer, max_norm: float) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return  # inside engine.step(), to the threshold _configure_deepspeed handed it
        if isinstance(strategy, FSDPStrategy):
            # Lightning refuses norm clipping under FSDP1: each rank holds only a shard of the flat
            # gradients, so the global norm needs the FSDP module's own method.
            self.model.clip_grad_norm_(max_norm)
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False) and getattr(strategy.precision_plugin, "scaler", None) is None:
            # Lightning refuses to clip for optimizers that can unscale inside step() (fused AdamW)
            # under mixed precision, for fear of clipping scaled gradients; bf16 scales nothing.
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate (n_rank, k) tensors from all ranks; ranks may hold different row counts."""
        if not (dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1):
            return rows
        counts = self.all_gather(torch.tensor(rows.shape[0], device=rows.device))
        padded = torch.zeros((int(counts.max()), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        gathered = self.all_gather(padded)
        return torch.cat([gathered[r, :int(n)] for r, n in enumerate(counts)])

    def _mark_batch_consumed(self) -> None:
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if isinstance(sampler, ResumableBatchSampler):
            sampler.consumed += 1
