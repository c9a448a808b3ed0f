"""Sharded training: which modules to shard (any HF model's decoder layers), FSDP2 sharding, and
the full weights of a sharded model back on one rank for an HF export.

Three ways a model can be sharded here, one per trainer config:
- `trainer=fsdp2`: Lightning's ModelParallelStrategy (`FSDP2Strategy` below);
  `strategies.FSDP2.shard` calls `shard_fsdp2` (torch's `fully_shard`) on each decoder layer, then
  on the model. Parameters become DTensors.
- `trainer=fsdp`: Lightning's FSDPStrategy (FSDP1); `strategies.FSDP1.shard` wraps the model with
  the strategy's settings (`wrap_fsdp1`), decoder layers as their own units by `DecoderLayerPolicy`.
- `trainer=deepspeed` at ZeRO stage 3: DeepSpeed partitions every parameter (they carry a `ds_id`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _Policy

from llm_stages.errors import ConfigError


def decoder_layer_names(model: nn.Module) -> set[str]:
    """Class names of the blocks an HF model says must not be split across devices
    (`_no_split_modules`, e.g. {"Qwen2DecoderLayer"}): its decoder layers, the natural unit to
    shard and to checkpoint activations of."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def decoder_layers(model: nn.Module, names: Iterable[str] | None = None) -> list[nn.Module]:
    """The modules of `model` whose class is named in `names` (default: its `_no_split_modules`)."""
    names = set(names or decoder_layer_names(model))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no module of a class named {sorted(names) or 'in _no_split_modules'}; "
                          "name the decoder layer class to shard (e.g. layer_cls: [LlamaDecoderLayer])")
    return layers


class DecoderLayerPolicy(_Policy):
    """An FSDP1 wrap (or activation checkpointing) policy on the decoder layer class, resolved when
    FSDP wraps the model rather than named in the config, so one config serves Qwen2, Llama, ...:
    `layer_cls` names the classes (null: every `_no_split_modules` found in the wrapped module)."""

    def __init__(self, layer_cls: Iterable[str] | None = None):
        super().__init__()
        self.layer_cls = list(layer_cls) if layer_cls else None

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        classes = {type(m) for m in decoder_layers(root_module, self.layer_cls)}
        return ModuleWrapPolicy(classes)._run_policy(root_module, ignored_modules, root_kwargs)


def shard_fsdp2(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer (its parameters are all-gathered just for its own
    forward and backward), then the model (embeddings, final norm, head). `param_dtype` (bf16 under
    bf16-mixed) is the dtype weights are all-gathered and computed in; gradients are still reduced
    and kept in float32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):  # configure_model runs again for every fit/validate
        return model
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # FSDP2 gathers a unit's weights when the unit's forward is called. Stages may call a model's
    # parts directly (PPO: the critic's backbone, then its value head), so each part holding weights
    # becomes a unit of its own, unless parts share weights (tied embeddings and LM head must stay in
    # one unit: then they stay in the model's, and the model is only ever called whole).
    parts = [child for child in model.children() if next(child.parameters(), None) is not None]
    weights = [{id(p) for p in part.parameters()} for part in parts]
    if len(parts) > 1 and not any(a & b for a, b in combinations(weights, 2)):
        for part in parts:
            fully_shard(part, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    mark_sharded(model)
    return model


def wrap_fsdp1(model: nn.Module, strategy) -> nn.Module:
    """FSDP1 with the settings of `trainer.strategy` (an FSDPStrategy: auto-wrap policy, sharding
    strategy, mixed precision, offload), applied to the model rather than, as Lightning would, to
    the whole LightningModule: Lightning then runs `training_step` inside that wrapper's forward,
    and FSDP1 cannot run a backward pass (the stages' manual optimisation) inside its own forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):  # configure_model runs again for every fit/validate
        return model
    mark_sharded(model)  # on the HF model itself: its generate() is reached through the wrapper
    wrapped = FullyShardedDataParallel(model, cpu_offload=strategy.cpu_offload,
                                       mixed_precision=strategy.mixed_precision_config,
                                       sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                       **strategy.kwargs)
    # Used here; Lightning would otherwise warn that the model is already wrapped and ignore it.
    strategy.kwargs.pop("auto_wrap_policy", None)
    return wrapped


@contextmanager
def generation_context(model: nn.Module):
    """Where a model may generate outside its own forward (FSDP1 only gathers the weights it holds
    at the top level, the embeddings, when its forward is called; `generate` calls the inner
    model's): those weights are gathered for the duration. The decoder layers, FSDP units of their
    own, gather theirs as usual."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield


def mark_sharded(model: nn.Module) -> None:
    """Each forward of a sharded model is a collective (every rank gathers the weights), so every
    rank must run the same number of forwards. HF `generate` then keeps stepping (`synced_gpus`)
    until all ranks are done; it reads this attribute to know (transformers' own FSDP2 sets it)."""
    model._is_fsdp_managed_module = True


def is_sharded(model: nn.Module) -> bool:
    """True when `model`'s forward needs every rank (FSDP1/FSDP2 wrapped, DeepSpeed ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    return (getattr(model, "_is_fsdp_managed_module", False)
            or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()))


def global_rank() -> int:
    """This process's rank among all (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """`model`'s complete state dict on CPU, gathered from its shards: a collective, every rank must
    call it; rank 0 gets the dict, the others {}. None when `model` is not sharded (its own
    `state_dict()` is complete)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    wrapped = isinstance(model, (FSDPModule, FullyShardedDataParallel))
    if wrapped or any(isinstance(p, DTensor) for p in model.parameters()):
        # cpu_offload: each tensor is gathered in turn and moved to CPU, on rank 0 only. Weights
        # already on the CPU stay where they are (FSDP1's offload crashes a CPU-only run); every
        # rank then holds the full dict, only rank 0 writes it.
        on_accelerator = next(model.parameters()).device.type != "cpu"
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator))
    elif any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitions
        import deepspeed

        # Gathers the whole model on every GPU at once: fine for an export, not for a model that
        # only fits sharded (then save the DeepSpeed checkpoint and use its zero_to_fp32.py).
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if global_rank() == 0 else {}
    else:
        return None
    # Tied weights (embeddings = LM head) come back as separate copies; save_pretrained only drops
    # the duplicate of a tensor it sees shared, so drop it here: the export matches an unsharded one.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(_clean_name(name), None)
    return state


def _clean_name(name: str) -> str:
    """A parameter's name without the wrapper modules FSDP1 and its activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


@contextmanager
def fsdp2_no_sync(module: nn.Module):
    """FSDP2's no_sync: backward keeps full (unsharded) gradients on each rank instead of
    reduce-scattering them; the next backward outside this context reduces the sum."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


@contextmanager
def deepspeed_no_sync(engine):
    """DeepSpeed's documented way for a caller that runs several backward passes and then one
    `engine.step()`: mark the backward passes before the last as not ending the accumulation."""
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2), with two changes to its sharded checkpoints (a
    directory: one file of shards per rank, and `meta.pt` with the loops', schedule's and data
    position's state):
    - written atomically, as the single-file checkpoints are: into a temporary sibling directory
      renamed into place once every rank has written, so a run killed mid-save keeps its previous one;
    - loaded as far as they go: a checkpoint may leave frozen weights out (they come back from the
      config), so only the weights it holds are read; every trained weight must be among them.
    `data_parallel_size=None` (conf/trainer/fsdp2.yaml) shards over every process of every node."""

    def setup_environment(self) -> None:
        if self._data_parallel_size is None:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)  # a directory cannot be renamed over a non-empty one
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / "meta.pt").is_file():  # a single-file (full) checkpoint
            return super().load_checkpoint(path, weights_only)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # keys: "state_dict.<name>", ...
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        missing = [name for name, p in self.model.named_parameters() if p.requires_grad and name not in model_state]
        if missing:
            raise ConfigError(f"{path} lacks {len(missing)} trained weights of this model (e.g. {missing[0]}): it was "
                              "written by a run with another model or stage")
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{i}"])
        checkpoint = torch.load(path / "meta.pt", weights_only=weights_only)
        # What a single-file checkpoint carries too (Lightning's load_model_state_dict is a no-op
        # here: the weights are already in place), so hooks can see which weights were restored.
        checkpoint["state_dict"] = model_state
        return checkpoint
