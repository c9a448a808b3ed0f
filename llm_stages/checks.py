"""Checking a composed config before anything is loaded: every value a run depends on, answered with one
ConfigError line naming the key, the value and what is allowed. A ground-floor module: it imports only
errors, ranges, models and losses, so the CLI can run it before the heavy layers load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llm_stages.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Where `make vllm` puts the vLLM environment's interpreter.
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


# Each rule: (key, test of a set value, what is allowed). A key the config does not have is skipped
# (stages differ: block_size is PT's, max_prompt_length the preference and RL stages').
def _integer(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(test):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)


def _one_of(*choices):
    return lambda v: v in choices


DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64", "64-true", "bf16", "16")

RULES = [
    ("seed", _integer(0), "an integer >= 0"),
    ("trainer.max_steps", lambda v: _integer(1)(v) or v == -1, "an integer >= 1, or -1 (no limit: trainer.max_epochs)"),
    ("trainer.val_check_interval", lambda v: _integer(1)(v) or _number(lambda x: 0 < x <= 1)(v),
     "an integer >= 1 (optimiser steps) or a fraction of an epoch in (0, 1]"),
    ("trainer.log_every_n_steps", _integer(1), "an integer >= 1"),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS[:6])}"),
    ("optim.lr", _number(lambda x: x > 0), "a number > 0, e.g. 1e-5"),
    ("optim.weight_decay", _number(lambda x: x >= 0), "a number >= 0"),
    ("optim.eps", _number(lambda x: x > 0), "a number > 0"),
    ("optim.warmup_steps", _integer(0), "an integer >= 0"),
    ("optim.scheduler", _one_of("cosine", "linear", "constant"), "one of cosine, linear, constant"),
    ("optim.min_lr_ratio", _number(lambda x: 0 <= x <= 1), "a number in [0, 1]"),
    ("optim.max_grad_norm", lambda v: v is None or _number(lambda x: x > 0)(v), "a number > 0, or null (no clipping)"),
    ("optim.betas", lambda v: isinstance(v, list) and len(v) == 2 and all(_number(lambda x: 0 <= x < 1)(b) for b in v),
     "two numbers in [0, 1), e.g. [0.9,0.95]"),
    ("datamodule.batch_size", _integer(1), "an integer >= 1"),
    ("datamodule.grad_accum", _integer(1), "an integer >= 1"),
    ("datamodule.val_batch_size", _integer(1), "an integer >= 1"),
    ("datamodule.max_length", _integer(1), "an integer >= 1 (tokens)"),
    ("datamodule.max_prompt_length", _integer(1), "an integer >= 1 (tokens)"),
    ("datamodule.block_size", _integer(1), "an integer >= 1 (tokens)"),
    ("model.dtype", _one_of(*DTYPES), f"one of {', '.join(DTYPES)}"),
    ("rollout.reward_model.dtype", _one_of(*DTYPES), f"one of {', '.join(DTYPES)}"),
    ("data.on_bad_record", _one_of("error", "skip"), "error or skip"),
    ("resume", _one_of(None, "auto"), "auto or null"),
    ("rollout.overlong_penalty_factor", _number(lambda x: x >= 0), "a number >= 0"),
    ("rollout.backend", _one_of("hf", "vllm"), "hf (the policy's generate) or vllm (a vLLM server; make vllm)"),
    ("rollout.vllm.importance_sampling", _one_of(None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
     "token_truncate, token_mask, sequence_truncate, sequence_mask, or null (no correction)"),
    ("rollout.vllm.importance_sampling_cap", _number(lambda x: x >= 1), "a number >= 1, e.g. 2.0"),
    ("module.max_extra_rounds", _integer(0), "an integer >= 0"),
    ("module.dynamic_sampling", lambda v: isinstance(v, bool), "true or false"),
    ("export.weights", _one_of("last", "best"),
     "last (the weights at the end) or best (the checkpoint with the best stage.key_metric)"),
    ("export.min_delta", _number(lambda x: x >= 0), "a number >= 0 (in the key metric's units)"),
]


def check_config(cfg, *, devices: bool = True) -> None:
    """Every value a run depends on, checked before any model or data is loaded: a mistake is one
    ConfigError naming the key, the value and what is allowed, not a traceback minutes later.
    `devices=False` leaves out whether the accelerators it asks for are visible here (a config
    checked on one machine to run on another)."""
    from omegaconf import OmegaConf

    from llm_stages.models import check_hub_model, check_model_dir

    for key, allowed, what in RULES:
        if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
            continue
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is not set; expected {what}")
        value = OmegaConf.select(cfg, key)
        plain = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if not allowed(plain):
            raise ConfigError(f"{key}={_show(plain)}: expected {what}")
    _check_declared_ranges(cfg)

    data = cfg.get("data") or {}
    if data and not data.get("sources") and OmegaConf.is_missing(data, "path"):
        raise ConfigError(f"data.path is not set (data={data.get('name')} reads your own file); pass "
                          "data.path=<file or directory>, or data.sources=[{path: ..., weight: ...}]")

    model = cfg.model
    if OmegaConf.is_missing(model, "path"):
        raise ConfigError(f"model.path is not set (model={model.get('name')} loads a local checkpoint); pass "
                          "model.path=<directory of a Hugging Face checkpoint, e.g. an export>")
    if model.get("path"):
        check_model_dir(model.path, tokenizer=not model.get("tokenizer"))
    elif model.get("hub_id") and not model.get("gguf"):
        check_hub_model(model.hub_id)
    module = cfg.get("module") or {}
    if cfg.get("loss") is not None:
        if "loss" not in module:
            raise ConfigError(f"loss={cfg.loss.get('name')} selects a preference loss, which stage={cfg.stage.name} "
                              "does not take: only stage=dpo does (drop loss=, or put it in the DPO stage's overrides)")
        from llm_stages.losses.preference import loss_settings

        loss_settings(cfg.loss)  # an unknown key or value: one line naming the loss's parameters
    if "advantage" in module:
        from llm_stages.losses.advantages import advantage_settings

        advantage_settings(module, module.get("beta", 0.0))  # an unknown estimator or a nonsense combination: one line
    _check_overlong(cfg.get("rollout") or {})
    _check_best_export(cfg)
    if devices:
        _check_devices(cfg)
    rollout = cfg.get("rollout") or {}
    if rollout.get("backend") == "vllm" and not (rollout.get("vllm") or {}).get("address"):
        vllm_python((rollout.get("vllm") or {}).get("python"))  # no vLLM environment: one line saying `make vllm`
    reward_model = (cfg.get("rollout") or {}).get("reward_model") or {}
    if OmegaConf.select(cfg, "module.teacher", default=None) is not None and OmegaConf.is_missing(cfg.module.teacher, "path"):
        raise ConfigError("module.teacher.path is not set: pass module.teacher.path=<directory of the teacher's "
                          "Hugging Face checkpoint, e.g. an SFT export>")
    teacher = OmegaConf.select(cfg, "module.teacher.path", default=None)
    for key, path in (("rollout.reward_model.path", reward_model.get("path")), ("module.critic_path", module.get("critic_path")),
                      ("module.teacher.path", teacher)):
        if path:
            check_model_dir(path, key=key, tokenizer=False)


def _check_declared_ranges(cfg) -> None:
    """The settings whose ranges are declared beside them: sampling (chat's `generation`, the RL stages'
    `rollout.generation` and `rollout.val_generation`, batch inference's `generate.generation`) and the
    stage's `module` settings. A preference
    loss's own (`loss.*`) are checked with its other settings by loss_settings."""
    from omegaconf import OmegaConf

    from llm_stages.losses.distill import DISTILL_RANGES
    from llm_stages.losses.kto import KTO_RANGES
    from llm_stages.losses.preference import DPO_MODULE_RANGES
    from llm_stages.losses.rl import GRPO_RANGES, PPO_RANGES
    from llm_stages.ranges import check_ranges, check_sampling_settings

    for key in ("generation", "rollout.generation", "rollout.val_generation", "generate.generation"):
        settings = OmegaConf.select(cfg, key, default=None)
        if settings is not None:
            check_sampling_settings(settings, key=key)
    module_ranges = {"dpo": DPO_MODULE_RANGES, "kto": KTO_RANGES, "ppo": PPO_RANGES, "grpo": GRPO_RANGES,
                     "distill": DISTILL_RANGES}
    stage = (cfg.get("stage") or {}).get("name")
    if stage in module_ranges and cfg.get("module") is not None:
        check_ranges(cfg.module, module_ranges[stage], "module")


def _check_overlong(rollout) -> None:
    buffer, limit = rollout.get("overlong_buffer"), (rollout.get("generation") or {}).get("max_new_tokens")
    if buffer is not None and not (_integer(1)(buffer) and (limit is None or buffer <= limit)):
        raise ConfigError(f"rollout.overlong_buffer={_show(buffer)}: expected an integer in [1, rollout.generation."
                          f"max_new_tokens={limit}] (tokens before the limit where the penalty starts), or null (off)")


def _check_best_export(cfg) -> None:
    """export.weights=best needs a checkpoint callback that keeps the best checkpoint by the stage's key metric."""
    if (cfg.get("export") or {}).get("weights") != "best" or not cfg.export.get("enabled", True):
        return
    key = (cfg.get("stage") or {}).get("key_metric", "val/loss")
    keeper = [name for name, cb in (cfg.get("callbacks") or {}).items()
              if cb is not None and cb.get("monitor") == key and cb.get("save_top_k", 1) != 0]
    if not keeper:
        raise ConfigError(f"export.weights=best exports the checkpoint with the best {key} (stage.key_metric), but no "
                          f"callback keeps one: use callbacks=default (its model_checkpoint monitors {key}) or export.weights=last")
    if not (cfg.get("trainer") or {}).get("limit_val_batches", 1.0):
        raise ConfigError("export.weights=best picks a checkpoint by validation, which trainer.limit_val_batches=0 turns off; "
                          "use export.weights=last or validate")


def _check_devices(cfg) -> None:
    """A GPU run on a machine without one (or with fewer than asked for) fails here, not deep in Lightning."""
    trainer, device = cfg.get("trainer") or {}, str(cfg.get("device") or "")  # device: chat's
    accelerator = str(trainer.get("accelerator", "")).lower()
    if accelerator not in ("gpu", "cuda") and not device.startswith("cuda"):
        return
    import torch  # here, not at the top: only a config that asks for a GPU pays for the import

    visible = torch.cuda.device_count()
    asked = f"device={device}" if device else _trainer_choice() or f"trainer.accelerator={accelerator}"
    if visible == 0:
        raise ConfigError(f"{asked} needs a CUDA GPU; none is visible (torch.cuda.is_available() is False); "
                          f"use {'device=cpu' if device else 'trainer=cpu'}")
    devices = trainer.get("devices")
    if isinstance(devices, int) or str(devices).isdigit():
        wanted = int(devices)  # -1: every visible one
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        wanted = len(devices)  # a list of GPU indices
    else:
        wanted = 0  # auto
    if wanted > visible:
        raise ConfigError(f"trainer.devices={devices}: {visible} CUDA GPU(s) visible; use trainer.devices={visible} or fewer")


def _trainer_choice() -> str | None:
    """`trainer=gpu` for the message, when the accelerator is that trainer option's, not an override's."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if any(o.lstrip("+").startswith("trainer.accelerator=") for o in hydra.overrides.task):
        return None
    return f"trainer={hydra.runtime.choices.get('trainer')}"


def _show(value) -> str:
    return repr(value) if isinstance(value, str) and (not value or value != value.strip()) else str(value)


def vllm_python(python: str | None) -> Path:
    path = Path(python).expanduser() if python else DEFAULT_VLLM_PYTHON
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        raise ConfigError(f"rollout.backend=vllm needs the vLLM environment: {path} does not exist; run `make vllm` "
                          "(or set rollout.vllm.python=<python of a venv with vllm>, or rollout.vllm.address=<running server>)")
    return path
