"""Where the Hydra configs live, and composing them outside the CLI (tests, pipelines)."""

from __future__ import annotations

from pathlib import Path

import llm_stages.conf

# conf/ at the repository top level, shipped in the wheel as the package llm_stages.conf.
CONFIG_DIR = Path(llm_stages.conf.__file__).parent


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from llm_stages.training.launch import log_file_suffix

    # ${log_file_suffix:<job name>} in conf/hydra/default.yaml: one log file per process of a multi-node run.
    OmegaConf.register_new_resolver("log_file_suffix", log_file_suffix, replace=True)


_register_resolvers()


def compose(overrides: list[str] | None = None, *, output_dir: str | None = None, config_name: str = "config"):
    """The config `python -m llm_stages <overrides>` would run, with `hydra:` interpolations
    resolvable, so `train(cfg)` can be called directly."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.run.dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
