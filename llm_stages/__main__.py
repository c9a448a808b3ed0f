"""CLI: python -m llm_stages stage=<name> model=<name> data=<name> [overrides] (Hydra; -m sweeps),
or python -m llm_stages <command> [overrides] for the commands in COMMANDS (each composes its own config)."""

from __future__ import annotations

import sys
from importlib import import_module

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from llm_stages.config import CONFIG_DIR
from llm_stages.errors import ConfigError, DataFormatError, TrainingDivergedError, TrainingInterrupted


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from llm_stages.train import train  # heavy imports after Hydra has parsed the command line

    try:
        if cfg.get("pipeline"):
            from hydra.core.hydra_config import HydraConfig

            from llm_stages.pipeline import run_pipeline

            cli = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("pipeline")]
            run_pipeline(cfg, cli)
            return None
        metrics = train(cfg)
    except (DataFormatError, ConfigError, TrainingDivergedError) as e:
        # A user's mistake, not a bug: one clear line instead of a traceback from deep inside.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except MissingMandatoryValue as e:  # a `???` in a config group the checks do not know
        print(f"error: {e.full_key} is not set; pass {e.full_key}=<value>", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(143)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


# A first word naming a command runs that module's main(overrides) instead of training.
COMMANDS = {"chat": "llm_stages.chat"}


def cli() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        main()
        return
    from hydra.errors import HydraException

    try:
        sys.exit(import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    except (DataFormatError, ConfigError, HydraException) as e:  # a bad override or model: one line
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
