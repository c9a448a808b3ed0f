"""What a run directory tells about its run: that it could be created at all (checked before Hydra
writes into it, so an unwritable path is one line, not a traceback), and how the run ended:
`<run dir>/status.yaml` (`status: running | completed | failed | interrupted`, `message`, `time`),
so `ls runs/*/*/status.yaml` tells what happened to each. Light imports only: Hydra loads this
module before the job starts."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "status.yaml"


def run_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot serve as a run directory (the reason the OS gives), or None: it is created
    when missing and a file is written in it, so a read-only filesystem shows here too."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


class CheckRunDir(Callback):
    """Hydra callback: creates the run directory (a sweep's directory under -m) before Hydra does,
    and stops with one line naming the override to change when it cannot be created or written."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _check(key: str, path: str) -> None:
        problem = run_dir_problem(path)
        if problem:
            print(f"error: {key}={path}: cannot create the run directory ({problem}); "
                  f"pass {key}=<a writable directory>", file=sys.stderr)
            sys.exit(2)


def write_status(run_dir: str | os.PathLike, status: str, message: str = "", **details) -> None:
    """Record how the run stands in `<run_dir>/status.yaml`, atomically, from global rank 0 only. A
    run directory that cannot take the file costs a warning, never the run (or the error being recorded)."""
    from llm_stages.training.launch import launch_rank
    from llm_stages.training.run_dir import write_text_atomic  # torch: not at Hydra's start

    if launch_rank() != "0":
        return
    import yaml

    record = {"status": status, "message": message, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **details}
    try:
        write_text_atomic(Path(run_dir) / STATUS_FILE, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    except OSError as e:
        log.warning("could not write %s in %s: %s", STATUS_FILE, run_dir, e.strerror or e)
