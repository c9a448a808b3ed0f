"""CLI: python -m llm_stages stage=<name> model=<name> data=<name> [overrides] (Hydra; -m sweeps)."""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    main()
