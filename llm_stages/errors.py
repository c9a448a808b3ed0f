"""Errors that reach users. Each names what to fix: a file, a record, a field."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file or record that cannot be used, with the place it was found.

    `line` is the 1-based line number for line-oriented files (.jsonl, .txt) and the 1-based record
    number for whole-file containers (.json arrays); `field` is the offending key, when there is one.
    """

    def __init__(self, path, why: str, *, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.why = str(path), line, field, why
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {why}")


class ConfigError(ValueError):
    """A configuration that cannot work, explained in terms of the config keys to change."""


class TrainingDivergedError(RuntimeError):
    """The loss or gradients became NaN/inf; raised before the bad update is applied."""


class TrainingInterrupted(RuntimeError):
    """A run stopped by SIGTERM/SIGINT after writing a checkpoint to resume from."""
