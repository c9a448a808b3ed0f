"""What every stage shares: the HF model and tokenizer, the optimiser and schedule, and one
optimiser step over a list of micro-batches with exact loss weighting.

Accumulation is done here rather than by Lightning's `accumulate_grad_batches`, because the right
denominator of a token-mean loss is the token count of the *whole* accumulated batch (on all
ranks), which is only known once all its micro-batches are in hand.

Under sharded strategies (`trainer=fsdp2|fsdp|deepspeed`) the same loop runs;
what differs (sharding, skipping gradient sync, clipping) is in llm_stages.training.strategies.
"""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch
import torch.distributed as dist

from llm_stages.training import strategies
from llm_stages.data.collate import ResumableBatchSampler
from llm_stages.errors import ConfigError
from llm_stages.training.optim import OptimConfig, build_optimizer


class Stage(L.LightningModule):
    # Why this stage cannot run under FSDP1 (`trainer=fsdp`), or None when it can.
    fsdp1_unsupported: str | None = None

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

    def release(self) -> None:
        """Frees what a stage runs beside its model (the RL stages' vLLM server) once it is done."""

    def trainable(self) -> torch.nn.Module:
        """What the optimiser updates (the model; PPO adds its critic)."""
        return self.model

    def exports(self) -> dict[str, torch.nn.Module]:
        """Models saved as HF checkpoints at the end, by folder name under the run dir."""
        return {"export": self.model}

    def configure_model(self) -> None:
        """Lightning's hook for sharding, called with the strategy set up: the strategy's own way of
        sharding, gradient sync and clipping is chosen here, once (see llm_stages.training.strategies)."""
        self.parallel = strategies.for_strategy(self.trainer.strategy)
        self.parallel.shard(self)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.trainable(), self.optim_cfg, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, micro_batches: list, batch_idx: int) -> torch.Tensor:
        loss, stats = self.accumulated_step(micro_batches, self.loss_sum, self.loss_weight)
        self._mark_batch_consumed()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        for k, v in (stats | self.derived_train_metrics(stats)).items():
            self.log(f"train/{k}", v)
        return loss

    def derived_train_metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics computed from a step's accumulated stats (e.g. KTO's means over one label)."""
        return {}

    def accumulated_step(self, micro_batches: list, loss_sum, loss_weight) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser (and schedule) step on the gradient of sum(loss_sum) / sum(loss_weight) over
        the micro-batches of all ranks. Returns that loss and each stat's sum / weight."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        weight = self._all_reduce(sum(loss_weight(mb) for mb in micro_batches).float()).clamp(min=1)
        world = self.trainer.world_size
        total = torch.zeros((), device=self.device)
        stats: dict[str, torch.Tensor] = {}
        for i, micro_batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self.parallel.no_sync(self):
                micro_loss, micro_stats = loss_sum(micro_batch)
                # DDP averages gradients over ranks; multiplying by world turns that into the global sum / weight.
                self.manual_backward(micro_loss * world / weight)
            total += micro_loss.detach()
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0) + v.detach()
        if self.optim_cfg.max_grad_norm:
            self.parallel.clip(self, optimizer, self.optim_cfg.max_grad_norm)
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
