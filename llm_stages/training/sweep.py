"""A multirun sweep (`python -m llm_stages -m optim.lr=1e-4,1e-3 ...`) checked whole before its first
job trains, and summarised as it goes: `<sweep dir>/summary.csv` and `summary.md`, one row per job
(the overrides that set it apart, status, the best and last value of the stage's key metric, run dir, W&B run).
A row is written when its job starts (status `running`) and rewritten when it ends, so a killed
sweep still leaves a summary, its last row the job that was running."""

from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "status", "metric", "best", "last", "run_dir", "wandb_run"]


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper expands the command line (and
    `hydra.sweeper.params`); None for other sweepers (optuna's trials are chosen as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def job_error(overrides: list[str]) -> str | None:
    """Why the job with these overrides would stop at its config check (None: it would not), composed
    as the job will be; Hydra's global state is left as the running sweep needs it."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue

    from llm_stages.checks import check_config
    from llm_stages.config import compose
    from llm_stages.errors import ConfigError, DataFormatError

    hydra, hydra_config = GlobalHydra.instance().hydra, HydraConfig.instance().cfg
    try:
        cfg = compose(overrides)
        if not cfg.get("pipeline"):  # a pipeline checks each of its stages' configs itself
            check_config(cfg)
    except (ConfigError, DataFormatError) as e:
        return str(e)
    except MissingMandatoryValue as e:
        return f"{e.full_key} is not set; pass {e.full_key}=<value>"
    except HydraException as e:
        return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    finally:
        GlobalHydra.instance().clear()
        if hydra is not None:
            GlobalHydra.instance().initialize(hydra)
        HydraConfig.instance().cfg = hydra_config
    return None


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))


def read_rows(sweep_dir: Path) -> list[dict]:
    file = sweep_dir / "summary.csv"
    return list(csv.DictReader(file.open(newline=""))) if file.is_file() else []


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    """summary.csv and summary.md, jobs in order; each file replaced whole."""
    from llm_stages.training.run_dir import write_text_atomic

    rows = sorted(rows, key=lambda r: int(r["job"]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({c: _cell(r.get(c)) for c in COLUMNS} for r in rows)
    write_text_atomic(sweep_dir / "summary.csv", out.getvalue())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    write_text_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")


def update_row(sweep_dir: Path, row: dict) -> None:
    """The job's row added, or replacing the one of the same job number (read back from summary.csv,
    so jobs that a launcher runs in other processes add to the same file)."""
    rows = [r for r in read_rows(sweep_dir) if r["job"] != str(row["job"])]
    write_summary(sweep_dir, rows + [row])


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): checks every job's config before the first trains,
    and keeps `summary.csv` / `summary.md` in the sweep directory. Global rank 0 alone writes."""

    def __init__(self):
        self._running: dict | None = None  # this process's job that has started and not ended
        self._shared: set[str] = set()  # the overrides every job of the sweep has
        self._sweep_dir: Path | None = None
        atexit.register(self._left_running)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(config)
        if jobs is None:
            # Another sweeper (optuna) picks each trial's values as it goes: the settings every trial
            # shares are checked once; a trial's row names the values it chose.
            self._shared = set(config.hydra.overrides.task)
            self._stop_on_error("the sweep", list(config.hydra.overrides.task))
            return
        shared = self._shared = set.intersection(*(set(job) for job in jobs))  # rows and errors name what varies
        for number, overrides in enumerate(jobs):
            varying = " ".join(o for o in overrides if o not in shared) or " ".join(overrides)
            self._stop_on_error(f"sweep job #{number} ({varying})", overrides)

    @staticmethod
    def _stop_on_error(what: str, overrides: list[str]) -> None:
        error = job_error(overrides)
        if error is not None:
            print(f"error: {what}: {error}; nothing was trained (fix the value and rerun the sweep)", file=sys.stderr)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.types import RunMode

        from llm_stages.training.launch import launch_rank

        if config.hydra.mode != RunMode.MULTIRUN or launch_rank() != "0":
            return
        self._sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        self._running = {"job": config.hydra.job.num,
                         "overrides": " ".join(o for o in overrides if o not in self._shared) or " ".join(overrides),
                         "status": "running", "metric": (config.get("stage") or {}).get("key_metric", "val/loss"),
                         "run_dir": config.hydra.runtime.output_dir}
        update_row(self._sweep_dir, self._running)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if self._running is None:
            return
        row, self._running = self._running, None
        row["status"] = "completed" if job_return.status == JobStatus.COMPLETED else "failed"
        metrics_file = Path(row["run_dir"]) / "metrics.json"
        if row["status"] == "completed" and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            key = row["metric"]
            row.update(best=metrics.get(f"{key}_best"), last=metrics.get(key), wandb_run=metrics.get("wandb_run"))
        update_row(self._sweep_dir, row)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._sweep_dir is not None and (self._sweep_dir / "summary.md").is_file():
            log.info("sweep summary: %s\n%s", self._sweep_dir / "summary.md", (self._sweep_dir / "summary.md").read_text())

    def _left_running(self) -> None:
        # The process is exiting inside a job (an error line and exit 2, an interrupt): that job failed.
        if self._running is not None and self._sweep_dir is not None:
            update_row(self._sweep_dir, {**self._running, "status": "failed"})
