"""Where the Hydra configs live, composing them outside the CLI (tests, pipelines), and Hydra's
composition errors as one line. No torch, Lightning or transformers here: the CLI composes (and
answers a mistake) before any of them loads."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import llm_stages.conf
from llm_stages.errors import ConfigError

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
    resolvable, so `train(cfg)` can be called directly. A bad override is one ConfigError line."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose_with_hydra(overrides, config_name=config_name)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.run.dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_with_hydra(overrides: list[str] | None = None, *, config_name: str = "config",
                       typed: list[str] | None = None):
    """The composed config with its `hydra:` node; Hydra's multi-line errors become one ConfigError line
    naming the override as `typed` (a sweep's first value is composed; the sweep is what was typed)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    try:
        return _hydra_compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: e.g. a group set to null
        raise ConfigError(hydra_error_line(e, overrides, config_name, typed)) from e


def _hydra_compose(overrides: list[str], config_name: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=True)


OVERRIDE_SYNTAX = ("key=value; +key=value adds a key, ~key deletes one; quote a value with spaces or "
                   "brackets: key='a b'")


def hydra_error_line(error: Exception, overrides: list[str], config_name: str = "config",
                     typed: list[str] | None = None) -> str:
    """What a Hydra composition error of `overrides` means, in one line naming the override as
    `typed` (default: `overrides`) and what is allowed: a config group's options, the config's keys
    closest to an unknown one, the syntax."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text, named = str(error), typed or overrides
    if isinstance(error, OverrideParseException):
        why = next((line for line in error.message.splitlines() if not line.startswith(("Error parsing", "See "))),
                   "cannot parse it")
        return f"{error.override}: not a valid override ({why}); write {OVERRIDE_SYNTAX}"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group = error.missing_cfg_file.rpartition("/")[0]
        as_typed = _typed(group, named)
        # not typed: an option named in a config file's defaults, not on the command line
        where = as_typed or text.splitlines()[0].rstrip(".")
        return no_such_option(where, group, error.options)
    if match := re.match(r"Could not override '([^']+)'", text):
        key = match.group(1)
        as_typed = _typed(key, named) or key
        near = _closest_keys(key, [o for o in overrides if _key(o) != key], config_name)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        add = as_typed if as_typed.startswith("+") else "+" + as_typed
        return f"{as_typed}: no such key in the config{hint} (to add a new key: {add})"
    if match := re.match(r"Could not append to config. An item is already at '([^']+)'", text):
        as_typed = _typed(match.group(1), named) or match.group(1)
        return f"{as_typed}: {match.group(1)} is already in the config; set it without the +: {as_typed.lstrip('+')}"
    if match := re.match(r"Ambiguous value for argument '([^']+)'", text):
        return sweep_needs_multirun(match.group(1))
    if text.startswith("Config group override must be a string or a list. Got NoneType"):
        group = next((_key(o) for o in named if o.endswith("=null") and group_options(_key(o)) is not None), "<group>")
        return (f"{group}=null: a config group is not set to null on the command line; "
                f"to leave it out, delete it: ~{group}")
    if match := re.match(r"Could not delete from config. '([^']+)' does not exist", text):
        return f"~{match.group(1)}: no such key in the config, nothing to delete"
    return "; ".join(_meaningful_lines(text)) or type(error).__name__


def sweep_needs_multirun(typed: str) -> str:
    key, _, value = typed.partition("=")
    return (f"{typed}: a comma-separated value is a sweep, which needs -m (--multirun); "
            f"for a list write {key}=[{value}], for a string quote it: {key}='{value}'")


def no_such_option(typed: str, group: str, options: list[str]) -> str:
    """`loss=nope: no such option; loss options: aot, ...`, without the `_`-prefixed building blocks."""
    listed = ", ".join(o for o in options if not o.startswith("_")) or "(none)"
    where = f" (conf/{group}/*.yaml)" if (CONFIG_DIR / group).is_dir() else ""
    return f"{typed}: no such option; {group} options: {listed}{where}"


def group_options(group: str) -> list[str] | None:
    """The options of a config group of conf/, or None when `group` is not one."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None


def _key(override: str) -> str:
    """`+trainer.max_steps=5` -> `trainer.max_steps`; `loss@module.loss=ipo` -> `loss`."""
    return override.lstrip("+~").partition("=")[0].partition("@")[0]


def _typed(key: str, overrides: list[str]) -> str | None:
    """The override as typed on the command line that sets `key` (a config key or a group)."""
    return next((o for o in overrides if _key(o) == key), None)


def _closest_keys(key: str, overrides: list[str], config_name: str) -> list[str]:
    """Up to three keys of the composed config (without the unknown one) whose last part is spelled
    like `key`'s, the closest whole names first (`max_steps=5` -> trainer.max_steps)."""
    from omegaconf import OmegaConf

    try:
        cfg = _hydra_compose(overrides, config_name)
    except Exception:  # the other overrides do not compose either: no suggestion, the one line still stands
        return []
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    leaf = key.rpartition(".")[2]
    alike = [k for k in _dotted_keys(tree) if difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio() >= 0.8]
    return sorted(alike, key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())[:3]


def _dotted_keys(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        yield prefix + str(name)
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{name}.")


def _meaningful_lines(text: str) -> list[str]:
    """Hydra's message without its search-path listing and its HYDRA_FULL_ERROR advice."""
    lines = []
    for line in text.splitlines():
        if line.startswith("Config search path") or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            break
        if line.strip():
            lines.append(line.strip())
    return lines
