"""What every task type shares: the typed result, the context a task runs in, and the task's data read through the data layer's own DataModules (readers, `data.columns`,
the chat template's rendering: prompts are rendered exactly as training renders them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llm_stages.data.demo import ensure_configured
from llm_stages.data.sources import Record
from llm_stages.errors import ConfigError


@dataclass(frozen=True)
class TaskResult:
    name: str
    type: str
    metrics: dict[str, float]  # the task's figures, the headline first; NaN where undefined
    examples: int  # how many records were evaluated
    details: dict[str, str] = field(default_factory=dict)  # files written (completions), what scored
    skipped: str | None = None  # why the task does not apply to this model (then no metrics)


@dataclass(frozen=True)
class EvalContext:
    """The model under evaluation and what the tasks share."""

    model: torch.nn.Module
    tokenizer: object
    head: str  # "causal_lm" | "reward" (an RM export)
    device: torch.device
    seed: int
    batch_size: int  # prompts, pairs or sequences per forward pass
    output_dir: Path
    reward_model: dict | None  # model config of an RM scoring generated replies (path: null = none)
    reference: torch.nn.Module | None  # frozen reference for implicit rewards (preference tasks)
    progress: bool = True


# What each task type's module provides (the registry itself is in run.py: TASK_TYPES).
TaskFn = Callable[[EvalContext, str, DictConfig], TaskResult]


def task_data(name: str, task: DictConfig) -> DictConfig:
    """The task's data config (the keys a `data=` config takes: path, format, columns, split, field,
    system_prompt, demo, ...), read whole: no validation split, no tokenization cache."""
    data = task.get("data")
    if data is None or not data.get("path"):
        raise ConfigError(f"eval.tasks.{name}.data.path is not set; give the task its file (any format the data "
                          "layer reads), e.g. eval.tasks.{name}.data.path=prompts.jsonl")
    data = OmegaConf.create({"val_path": None, "val_ratio": 0.0, "cache_dir": None, "on_bad_record": "error",
                             **OmegaConf.to_container(data, resolve=True)})
    ensure_configured(data)  # the demo files, written on first use
    return data


def read_task(datamodule, data: DictConfig) -> list[tuple[Record, object]]:
    """(record, rendered example) for every record of the task's file, through `datamodule`'s kind."""
    path = Path(str(data.path))
    pairs = list(datamodule.rendered_records(path, "eval"))
    if not pairs:
        from llm_stages.errors import DataFormatError

        raise DataFormatError(path, datamodule.nothing_left())
    return pairs


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def progress(items, ctx: EvalContext, desc: str):
    if not ctx.progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
