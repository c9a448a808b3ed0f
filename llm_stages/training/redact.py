"""Credentials kept out of everything a run writes: the logged hyperparameters, Hydra's `.hydra/`
files and a sweep's `multirun.yaml`. (W&B's own record of the command line is turned off in
llm_stages.training.loggers.) Pass keys through environment variables (WANDB_API_KEY, HF_TOKEN), not overrides."""

from __future__ import annotations

import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|passw(or)?d|credentials?)$", re.IGNORECASE)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|[0-9a-f]{40}|sk-[A-Za-z0-9_-]{20,})$")  # HF, W&B, OpenAI-style keys
HIDDEN = "***"


def _is_secret_key(key) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.search(key.rsplit(".", 1)[-1].lstrip("+~")))


def _is_interpolation(value) -> bool:
    # `${oc.env:WANDB_API_KEY}` names where a key comes from; it is not the key.
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


def redact_secrets(config):
    """The config with anything that looks like a credential replaced by '***' (by key name or by
    the shape of the value), so a logged config never carries one."""
    if isinstance(config, dict):
        return {k: HIDDEN if _is_secret_key(k) and config[k] not in (None, "", False) and not _is_interpolation(config[k])
                else redact_secrets(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact_secrets(v) for v in config]
    if isinstance(config, str) and SECRET_VALUE.match(config):
        return HIDDEN
    return config


def secret_values(config, overrides: list[str] = ()) -> set[str]:
    """Every credential in a config (by key name or value shape) and in `key=value` overrides, so it
    can also be found where it is part of a longer string (Hydra's override_dirname, a URL)."""
    found: set[str] = set()

    def walk(node, secret_key: bool = False) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, _is_secret_key(k))
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node and not _is_interpolation(node) and (secret_key or SECRET_VALUE.match(node)):
            found.add(node)

    walk(config)
    for override in overrides:
        key, sep, value = override.partition("=")
        value = value.strip().strip("'\"")
        if sep and value and not _is_interpolation(value) and (_is_secret_key(key) or SECRET_VALUE.match(value)):
            found.add(value)
    return found


def scrub(config, secrets: set[str]):
    """`redact_secrets`, and each of `secrets` replaced wherever it occurs inside a string."""
    config = redact_secrets(config)
    if isinstance(config, dict):
        return {k: scrub(v, secrets) for k, v in config.items()}
    if isinstance(config, list):
        return [scrub(v, secrets) for v in config]
    if isinstance(config, str):
        for secret in sorted(secrets, key=len, reverse=True):
            config = config.replace(secret, HIDDEN)
    return config


class SaveRedactedConfig(Callback):
    """Writes what Hydra would write to `<run dir>/.hydra/` (config.yaml, hydra.yaml, overrides.yaml),
    credentials redacted; conf/hydra/default.yaml turns Hydra's own writer off (`output_subdir: null`),
    which would store an override like `+wandb.api_key=...` as typed. A sweep's `multirun.yaml` is
    rewritten the same way when its first job starts. Global rank 0 alone writes."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.types import RunMode

        from llm_stages.training.launch import launch_rank
        from llm_stages.training.run_dir import write_text_atomic

        if launch_rank() != "0":
            return  # the other processes of a multi-process launch: rank 0 writes the run's files
        hydra_cfg = OmegaConf.to_container(config.hydra, resolve=False)
        task_cfg = OmegaConf.to_container(config, resolve=False)
        task_cfg.pop("hydra", None)
        overrides = list(config.hydra.overrides.task)
        secrets = secret_values(task_cfg, overrides) | secret_values(hydra_cfg)
        out = Path(config.hydra.runtime.output_dir) / ".hydra"
        for name, content in (("config.yaml", task_cfg), ("hydra.yaml", {"hydra": hydra_cfg}),
                              ("overrides.yaml", overrides)):
            write_text_atomic(out / name, OmegaConf.to_yaml(OmegaConf.create(scrub(content, secrets))))
        if config.hydra.mode == RunMode.MULTIRUN:
            sweep = Path(config.hydra.sweep.dir) / "multirun.yaml"
            if sweep.is_file():
                saved = OmegaConf.to_container(OmegaConf.load(sweep), resolve=False)
                write_text_atomic(sweep, OmegaConf.to_yaml(OmegaConf.create(scrub(saved, secrets))))
