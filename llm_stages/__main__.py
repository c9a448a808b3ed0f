"""CLI: python -m llm_stages stage=<name> model=<name> data=<name> [overrides] (Hydra; -m sweeps).
`python -m llm_stages <command> [overrides]` runs a command instead of training: `generate` and `eval`
(stages without training, see COMMANDS) or `chat` (its own loop and config, see OWN_CONFIG_COMMANDS)."""

from __future__ import annotations

import sys
from importlib import import_module

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from llm_stages.config import CONFIG_DIR
from llm_stages.errors import ConfigError, DataFormatError, TrainingDivergedError, TrainingInterrupted


# A first word that names a command is that command's stage config (conf/stage/<command>.yaml):
# `python -m llm_stages generate model.path=... data.path=prompts.jsonl` = `... stage=generate ...`.
COMMANDS = {"generate": "stage=generate", "eval": "stage=eval"}
# A first word naming one of these runs that module's main(overrides), which composes its own config.
OWN_CONFIG_COMMANDS = {"chat": "llm_stages.chat"}


def command_argv(argv: list[str]) -> list[str]:
    """argv with a leading command word replaced by its stage override; an `eval=<suite>` that names
    no conf/eval/<suite>.yaml is refused in one line here (Hydra's own message is a page)."""
    argv = list(argv)
    if len(argv) > 1 and argv[1] in COMMANDS:
        argv[1] = COMMANDS[argv[1]]
    for arg in argv[1:]:
        if arg.startswith("eval=") and not (CONFIG_DIR / "eval" / f"{arg[5:]}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "eval").glob("[!_]*.yaml")))
            print(f"error: {arg}: no such eval suite (conf/eval/{arg[5:]}.yaml); known: {known}", file=sys.stderr)
            sys.exit(2)
    return argv


def check_run_dir_shared(cfg: DictConfig, hydra_overrides: list[str]) -> None:
    """Processes on several machines write one run dir, so it must be named the same on each: the
    default is named after the start time, which differs between them."""
    nodes = (cfg.get("trainer") or {}).get("num_nodes") or 1
    if nodes > 1 and not any(o.startswith("hydra.run.dir=") for o in hydra_overrides):
        raise ConfigError(f"trainer.num_nodes={nodes}: pass hydra.run.dir=<a directory on a filesystem every "
                          "node sees>, the same on every node (the default is named after each node's start time)")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from llm_stages.training.quiet import quiet_third_party

    quiet_third_party()  # before the heavy imports: some libraries speak as they load
    from llm_stages.train import train  # heavy imports after Hydra has parsed the command line

    try:
        if HydraConfig.get().mode.name == "RUN":
            check_run_dir_shared(cfg, list(HydraConfig.get().overrides.hydra))
        if cfg.get("pipeline"):
            from llm_stages.pipeline import run_pipeline

            cli = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("pipeline")]
            run_pipeline(cfg, cli)
            return None
        if cfg.stage.name in ("eval", "generate"):
            from llm_stages.evaluate.run import evaluate, generate

            evaluate(cfg) if cfg.stage.name == "eval" else generate(cfg)
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


def cli() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in OWN_CONFIG_COMMANDS:
        sys.argv = command_argv(sys.argv)
        main()
        return
    from hydra.errors import HydraException

    try:
        sys.exit(import_module(OWN_CONFIG_COMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    except (DataFormatError, ConfigError, HydraException) as e:  # a bad override or model: one line
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
