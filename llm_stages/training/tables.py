"""Rows of text worth reading during training (generation samples, RL rollouts): appended to a
JSONL file in the run directory and, with the W&B logger, logged as a table."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def record_table(trainer, name: str, columns: list[str], new_rows: list[list], all_rows: list[list]) -> None:
    """Append `new_rows` to `<run dir>/<name>.jsonl` and log `all_rows` as the W&B table `name`
    (W&B tables are replaced, not appended, on each log)."""
    path = Path(trainer.default_root_dir) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in new_rows:
            f.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(name, columns=columns, data=all_rows)
