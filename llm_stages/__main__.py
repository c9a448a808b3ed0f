"""CLI: python -m llm_stages stage=<name> model=<name> data=<name> [overrides] (Hydra; -m sweeps).
`python -m llm_stages <command> [overrides]` runs a command instead of training: `generate` and `eval`
(stages without training, see COMMANDS) or `chat` (its own loop and config, see OWN_CONFIG_COMMANDS)."""

from __future__ import annotations

import sys
from importlib import import_module

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from llm_stages.config import (CONFIG_DIR, compose, compose_with_hydra, group_options, hydra_error_line, no_such_option,
                               sweep_needs_multirun)
from llm_stages.errors import ConfigError, DataFormatError, TrainingDivergedError, TrainingInterrupted


# A first word that names a command is that command's stage config (conf/stage/<command>.yaml):
# `python -m llm_stages generate model.path=... data.path=prompts.jsonl` = `... stage=generate ...`.
COMMANDS = {"generate": "stage=generate", "eval": "stage=eval"}
# A first word naming one of these runs that module's main(overrides), which composes its own
# primary config (conf/<name>.yaml): (module, config name).
OWN_CONFIG_COMMANDS = {"chat": ("llm_stages.chat", "chat")}
# Hydra's flags that show something other than this config or take another one: left to Hydra unchecked.
UNCHECKED_FLAGS = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun", "config_path", "config_dir")


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


def check_command_line(args: list[str]) -> None:
    """Compose what Hydra is about to compose, so that a mistake (an unknown group option or key, an
    override that does not parse, a sweep without -m) is one ConfigError line, answered before Hydra
    (whose own message is a page) and before torch or Lightning load. A sweep is checked as its first
    job, with every option of a swept config group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode

    parsed = parse_hydra_args(args)
    if any(getattr(parsed, flag) for flag in UNCHECKED_FLAGS):
        return
    commands = ", ".join([*COMMANDS, *OWN_CONFIG_COMMANDS])
    for word in parsed.overrides:
        if "=" not in word and not word.startswith("~"):
            raise ConfigError(f"{word}: neither a command (first word: {commands}) nor an override (key=value)")
    config_name = parsed.config_name or "config"
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as e:
        raise ConfigError(hydra_error_line(e, parsed.overrides, config_name)) from e
    first_job, sweeps = [], []
    for override in overrides:
        if not override.is_sweep_override():
            first_job.append(override.input_line)
            continue
        sweeps.append(override.input_line)
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:  # interval(...), glob(...): a sweeper's search space, not a list to check
            continue
        options = group_options(override.key_or_group)
        for value in values if options is not None else []:
            if value not in options:
                raise ConfigError(no_such_option(f"{override.key_or_group}={value} (in {override.input_line})",
                                                 override.key_or_group, options))
        first_job.append(f"{override.get_key_element()}={values[0]}")
    cfg = compose_with_hydra(first_job, config_name=config_name, typed=parsed.overrides)
    if sweeps and not parsed.multirun and cfg.hydra.mode != RunMode.MULTIRUN:  # hparams_search=optuna sets it itself
        raise ConfigError(sweep_needs_multirun(sweeps[0]))


def parse_hydra_args(args: list[str]):
    """The command line as Hydra reads it: its flags (-m, --cfg job, ...) and `.overrides`."""
    from hydra._internal.utils import get_args_parser  # Hydra's own parser: the same flags, read the same way

    return get_args_parser().parse_args(args)


def print_help(overrides: list[str]) -> None:
    """`--help`: what Hydra's own help shows (the config groups, the composed config), without its
    walk over every group's options, which takes seconds: the groups here are conf/'s folders."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    groups = [folder.name for folder in sorted(CONFIG_DIR.iterdir())
              if folder.is_dir() and folder.name not in ("hydra", "__pycache__")]
    listed = "\n".join(f"  {group}: {', '.join(o for o in group_options(group) if not o.startswith('_'))}"
                       for group in groups)
    composed = "Config" + (f" with {' '.join(overrides)}" if overrides else "")
    print(f"""usage: python -m llm_stages [command] [group=option ...] [key=value ...] [-m] [--cfg job] [--hydra-help]
commands (the first word): {", ".join(COMMANDS)} (stages without training), chat (chat --help)

== Config groups (group=option; conf/<group>/<option>.yaml) ==
{listed}

== {composed} (key=value sets a key, +key=value adds one, ~key deletes one) ==
{OmegaConf.to_yaml(cfg)}
-m: a sweep over comma-separated values (optim.lr=1e-5,1e-4), one run each; --cfg job: print the config, run nothing""")


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
        try:
            if {"-h", "--help"} & set(sys.argv[1:]):
                print_help(parse_hydra_args(sys.argv[1:]).overrides)
                return
            check_command_line(sys.argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        main()
        return
    from hydra.errors import HydraException

    module, config_name = OWN_CONFIG_COMMANDS[sys.argv[1]]
    overrides = sys.argv[2:]
    try:
        if not {"-h", "--help"} & set(overrides):
            compose_with_hydra(overrides, config_name=config_name)  # a mistake in one line, before the module's imports
        sys.exit(import_module(module).main(overrides))
    except (DataFormatError, ConfigError, HydraException) as e:  # a bad override or model: one line
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
