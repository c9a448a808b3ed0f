"""Environments from other ecosystems, each behind an optional extra: reasoning-gym tasks as RL prompts
with their own verifiers as the reward (`reasoning_gym.py`), and OpenEnv environments as episode
environments of the `reset` / tool methods / `get_reward` protocol (`openenv.py`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from llm_stages.errors import ConfigError


def require(module: str, package: str, extra: str, needed_by: str) -> ModuleType:
    """`module` imported, or one ConfigError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            # installed, but one of its own imports fails (a missing or mismatched dependency)
            raise ConfigError(f"{needed_by}: {package} is installed but cannot be imported ({e}); reinstall it "
                              f"with pip install 'llm_stages[{extra}]'") from None
        raise ConfigError(f"{needed_by} needs {package}, which is not installed: pip install 'llm_stages[{extra}]' "
                          f"(or pip install {package})") from None
