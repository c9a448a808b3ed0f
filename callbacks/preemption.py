"""Stop cleanly on SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C), writing a checkpoint first."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class SaveOnSignal(L.Callback):
    """Lightning turns SIGTERM into an exception raised between two training steps; this callback
    makes the first SIGINT do the same (a second one interrupts at once) and, when that exception
    comes, writes `<dirpath>/last.ckpt` (atomically: llm_stages.training.run_dir.AtomicCheckpointIO) from the state
    after the last finished step. `ckpt_path=last` or `resume=auto` then resumes from it exactly."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self._previous = None
        self.saved: Path | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero and trainer.world_size > 1:
            return  # Lightning broadcasts rank 0's signal to the other ranks
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint(trainer))
        except ValueError:  # not the main thread (e.g. some notebook runners): keep the default behaviour
            self._previous = None

    def _on_sigint(self, trainer):
        def handler(signum, frame):
            log.warning("SIGINT: stopping after this step and writing a checkpoint (press Ctrl-C again to abort)")
            trainer._signal_connector.received_sigterm = True
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        return handler

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path)
            self.saved = path
            log.warning("stopped by a signal after step %d; checkpoint written to %s", trainer.global_step, path)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
