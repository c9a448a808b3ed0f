"""Lightning's CSV and W&B loggers, for runs that stop and resume: a resumed run continues the
history of the run it resumes (the same metrics.csv, the same W&B run) instead of replacing it."""

from __future__ import annotations

import csv
import inspect
import io
from pathlib import Path

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import csv_logs, wandb
from lightning.pytorch.loggers.logger import rank_zero_experiment

from llm_stages.training.run_dir import write_text_atomic


def build_loggers(group, *, resuming: bool) -> list:
    """The loggers of the `logger` config group; those that take `resuming` are told whether this
    run continues a checkpoint."""
    loggers = []
    for config in (group or {}).values():
        if config is None or "_target_" not in config:
            continue
        takes_resuming = "resuming" in inspect.signature(get_class(config._target_)).parameters
        loggers.append(instantiate(config, **({"resuming": resuming} if takes_resuming else {})))
    return loggers


class _AppendingWriter(csv_logs.ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv when it starts; this one keeps its rows.
    Rows of the steps a resumed run redoes (logged after its checkpoint, before the interruption) are
    replaced by the new ones, so each step appears once."""

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self._earlier = list(csv.DictReader(f))

    def save(self) -> None:
        if self._earlier is None or not self.metrics:
            return super().save()
        # The first save of the resumed run rewrites the file (atomically: the history survives a kill
        # now too) with the earlier rows before the step it resumed at; later saves append.
        resumed_at = min(int(row["step"]) for row in self.metrics)
        rows = [r for r in self._earlier if int(float(r["step"])) < resumed_at] + self.metrics
        self._earlier, self.metrics = None, []
        self.metrics_keys = sorted(set().union(*rows))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(Path(self.metrics_file_path), out.getvalue())


class CSVLogger(csv_logs.CSVLogger):
    """`csv_logs.CSVLogger` whose resumed runs append to the metrics.csv they find (a fresh run in
    the same directory still starts a new file)."""

    def __init__(self, *args, resuming: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._resuming = resuming

    @property
    @rank_zero_experiment
    def experiment(self) -> csv_logs.ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            writer = _AppendingWriter if self._resuming else csv_logs.ExperimentWriter
            self._experiment = writer(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(wandb.WandbLogger):
    """`wandb.WandbLogger` that keeps its run id in `<save_dir>/wandb/run_id`, so a resumed run
    continues the same W&B run (`resume="allow"`), and that does not record the command line or
    system metadata (the command line may hold a key: W&B would store it in the run, and `wandb sync`
    upload it)."""

    def __init__(self, *, save_dir: str = ".", resuming: bool = False, id: str | None = None, **kwargs):
        self._id_file = Path(save_dir) / "wandb" / "run_id"
        if id is None and resuming and self._id_file.is_file():
            id = self._id_file.read_text().strip() or None
        if id is not None:
            kwargs.setdefault("resume", "allow")
        kwargs.setdefault("settings", {"x_disable_meta": True})
        super().__init__(save_dir=save_dir, id=id, **kwargs)
        # Lightning passes anonymous=None, which W&B warns has no effect; not passing it is the same.
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        new = self._experiment is None
        run = super().experiment
        if new and run is not None:
            write_text_atomic(self._id_file, run.id + "\n")
        return run
