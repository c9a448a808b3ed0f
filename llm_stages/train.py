"""train(cfg): build everything a config names, validate, fit, validate, export. No CLI code here."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning.pytorch.utilities.exceptions import SIGTERMException


from llm_stages.adapters import exportable, load_trainable_model
from llm_stages.checks import check_config
from llm_stages.errors import ConfigError, DataFormatError, TrainingInterrupted
from llm_stages.training.export import export_hf
from llm_stages.training.loggers import build_loggers
from llm_stages.models import load_tokenizer
from llm_stages.training.perf import peak_memory_gb
from llm_stages.training.quiet import quiet_third_party
from llm_stages.training.redact import redact_secrets
from llm_stages.training.run_dir import (AtomicCheckpointIO, loads_weights_only, remove_stale_temporaries,
                                         resolve_checkpoint, write_text_atomic)
from llm_stages.training.run_status import write_status

# Lightning warns at every periodic checkpoint of a manually optimised module that the state saved is
# the one after the optimiser step: global_step counts finished steps, so that is the state to resume.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# Lightning warns when any submodule is in eval mode as training starts: the frozen models a stage holds
# (reference, reward model, teacher) are, on purpose; what is trained is put in train mode by each
# stage's on_fit_start (stages/base.py).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list:
    """The group's objects; a factory may return None for "not in this run" (callbacks.progress_bar)."""
    built = [_instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]
    return [b for b in built if b is not None]


def _instantiate(config, **kwargs):
    """Hydra's instantiate, with our own errors (a bad setting, bad data) re-raised as themselves
    rather than wrapped, so the CLI reports them in one line."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ConfigError, DataFormatError)):
            raise e.__cause__ from None
        raise


def build(cfg: DictConfig):
    """The stage's LightningModule (holding model and tokenizer) and its DataModule."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.model)
    # The DataModule first: settings that cannot work are refused before the weights are loaded
    # (it reads no data until setup(), after the model has added its tokens to the tokenizer).
    datamodule = _instantiate(cfg.datamodule, data=cfg.data, tokenizer=tokenizer, seed=cfg.seed, _recursive_=False)
    model = load_trainable_model(cfg.model, tokenizer, head=cfg.stage.get("model_head", "causal_lm"),
                                 peft_cfg=cfg.get("peft"))
    module = _instantiate(cfg.module, model=model, tokenizer=tokenizer, optim=instantiate(cfg.optim))
    return module, datamodule


def _log_export_artifacts(cfg: DictConfig, loggers: list, metrics: dict) -> None:
    """With `logger.wandb.log_model=true`, each export is also logged as a W&B model artifact."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb") or {}
    if not wandb_cfg.get("log_model"):
        return
    import wandb

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key, path in metrics.items():
                if key.endswith("export_dir"):
                    artifact = wandb.Artifact(f"{cfg.stage.name}-{logger.experiment.id}-{key[:-4]}", type="model")
                    artifact.add_dir(path)
                    logger.experiment.log_artifact(artifact)


def _sweep_group() -> str | None:
    """The W&B group shared by the jobs of one multirun sweep: its directory's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    return f"{sweep_dir.parent.parent.name}-sweep-{sweep_dir.name}"


def train(cfg: DictConfig) -> dict:
    """Run one stage. Returns its metrics: val/loss before and after, train/loss, export path. How
    the run ended (completed, failed and why, interrupted) is left in <run dir>/status.yaml."""
    quiet_third_party()
    run_dir = cfg.paths.output_dir
    write_status(run_dir, "running")
    try:
        metrics = _train(cfg)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        write_status(run_dir, "interrupted", str(e) or "interrupted by Ctrl-C")
        raise
    except BaseException as e:
        write_status(run_dir, "failed", str(e) or type(e).__name__, error=type(e).__name__)
        raise
    write_status(run_dir, "completed", f"{metrics['steps']} steps", steps=metrics["steps"])
    return metrics


def _train(cfg: DictConfig) -> dict:
    check_config(cfg)  # a mistake in one line, before a model or data is loaded
    remove_stale_temporaries(cfg.paths.output_dir)  # what a killed export or checkpoint write left
    ckpt_path = resolve_checkpoint(cfg)
    if cfg.get("group") is None and _sweep_group():
        with open_dict(cfg):
            cfg.group = _sweep_group()
    module, datamodule = build(cfg)
    tokenizer = module.tokenizer

    loggers = build_loggers(cfg.get("logger"), resuming=ckpt_path is not None)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=_instantiate_group(cfg.get("callbacks")),
                                     plugins=[AtomicCheckpointIO()])
    for logger in loggers:
        logger.log_hyperparams(redact_secrets(OmegaConf.to_container(cfg, resolve=True)))

    metrics: dict = {"stage": cfg.stage.name, "key_metric": cfg.stage.get("key_metric", "val/loss"),
                     "output_dir": str(cfg.paths.output_dir)}
    start = None  # export.weights=best: the weights training starts from are a candidate too
    if cfg.get("validate_before_fit") and not ckpt_path:
        before = trainer.validate(module, datamodule=datamodule, verbose=False)
        if before:
            metrics.update({f"{k}_before": float(v) for k, v in before[0].items()})
            if cfg.export.get("weights") == "best":
                start = _trained_weights(module)

    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path,
                    weights_only=loads_weights_only(ckpt_path) if ckpt_path else None)
    except SIGTERMException:
        raise TrainingInterrupted(
            f"stopped by a signal at step {trainer.global_step}; checkpoint: {cfg.paths.output_dir}/checkpoints/last.ckpt. "
            f"Resume with the same command plus hydra.run.dir={cfg.paths.output_dir} resume=auto") from None
    metrics["fit_seconds"] = time.perf_counter() - started
    metrics["steps"] = trainer.global_step
    metrics.update(peak_memory_gb(trainer))  # of training (and validation before it); max over ranks
    metrics.update({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
    metrics.update(_best_scores(trainer))
    if cfg.export.get("weights") == "best":
        metrics.update(_restore_best(trainer, module, metrics, start, cfg.stage.get("key_metric_mode", "min"),
                                     float(cfg.export.get("min_delta") or 0.0)))

    after = trainer.validate(module, datamodule=datamodule, verbose=False) if trainer.limit_val_batches else []
    module.release()
    if after:
        metrics.update({k: float(v) for k, v in after[0].items()})

    if cfg.export.enabled:
        # Every rank: a sharded model's full weights are gathered from all of them (rank 0 writes).
        for name, model in module.exports().items():
            model = exportable(model, cfg.export.merge_lora)
            metrics[f"{name}_dir"] = str(export_hf(model, tokenizer, Path(cfg.paths.output_dir) / name))
        if trainer.is_global_zero:
            _log_export_artifacts(cfg, loggers, metrics)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        _print_summary(metrics)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # offline: no URL until `wandb sync`; the run's local directory instead
                metrics["wandb_run"] = logger.experiment.url or str(Path(logger.experiment.dir).parent)
                # Lightning leaves the W&B run open; the next train() in this process (a pipeline,
                # a test) would otherwise log into it instead of starting its own.
                logger.experiment.finish()
        # What a sweep's summary (llm_stages.training.sweep) reads back for this job.
        write_text_atomic(Path(cfg.paths.output_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _best_scores(trainer) -> dict:
    """`<metric>_best`: the best value of each metric a checkpoint callback monitors."""
    return {f"{cb.monitor}_best": float(cb.best_model_score) for cb in trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) and getattr(cb, "best_model_score", None) is not None}


def _trained_weights(module) -> dict:
    """A CPU copy of what training changes (the trainable weights), as a checkpoint's state_dict holds it."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if k in trainable}


def _restore_best(trainer, module, metrics: dict, start: dict | None, mode: str, min_delta: float = 0.0) -> dict:
    """export.weights=best: the trained weights with the best key metric loaded back into the module
    before the final validation and the export: those of the best checkpoint, or the starting weights
    when no checkpoint beat the validation before training by at least `min_delta` (export.min_delta:
    training did not help by more than the validation's noise). Frozen weights (a reference, the base
    under LoRA) are not in checkpoints and stay as they are."""
    import torch

    key = metrics["key_metric"]
    kept = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None) == key and cb.best_model_path]
    before = metrics.get(f"{key}_before")
    best = float(kept[0].best_model_score) if kept else None
    gain = None if best is None or before is None else (best - before if mode == "max" else before - best)
    if start is not None and before is not None and (gain is None or gain < min_delta):
        module.load_state_dict(start, strict=False)
        log.info("export.weights=best: no checkpoint beat the weights training started from (%s %.4f) by at least "
                 "export.min_delta=%g; exporting those", key, before, min_delta)
        return {"export_step": 0}
    if not kept:  # no validation ran (max_steps below val_check_interval): the last weights are all there is
        log.warning("export.weights=best: no checkpoint by %s was written; exporting the last weights", key)
        return {"export_step": trainer.global_step}
    checkpoint = torch.load(kept[0].best_model_path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ConfigError(f"export.weights=best: {kept[0].best_model_path} holds sharded weights (FSDP1, DeepSpeed) "
                          "that cannot be loaded back here; use export.weights=last")
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    log.info("export.weights=best: the weights of step %d (%s %.4f) instead of step %d", checkpoint["global_step"],
             key, best, trainer.global_step)
    return {"export_step": int(checkpoint["global_step"])}


def _print_summary(metrics: dict) -> None:
    lines = [f"stage {metrics['stage']}: {metrics['steps']} steps in {metrics['fit_seconds']:.1f}s"]
    if "val/loss_before" in metrics and "val/loss" in metrics:
        before, after = metrics["val/loss_before"], metrics["val/loss"]
        lines.append(f"held-out loss {before:.4f} -> {after:.4f} ({100 * (before - after) / before:+.1f}% drop)")
    key = metrics["key_metric"]
    if key != "val/loss" and key in metrics:
        lines.append(f"{key} {metrics.get(key + '_before', float('nan')):.4f} -> {metrics[key]:.4f}")
    if "perf/peak_rss_gb" in metrics:
        cuda = metrics.get("perf/cuda_max_allocated_gb")
        lines.append(f"peak memory: {metrics['perf/peak_rss_gb']:.2f} GiB RSS"
                     + (f", {cuda:.2f} GiB CUDA allocated" if cuda is not None else "") + " (max over ranks)")
    if "export_dir" in metrics:
        best = f" (the best checkpoint by {key}: step {metrics['export_step']})" if "export_step" in metrics else ""
        lines.append(f"export: {metrics['export_dir']}{best}")
    log.info("\n".join(lines))
