"""What a stage's data becomes before any training: `python -m llm_stages.data inspect [overrides]`.

Builds only the tokenizer and the stage's DataModule (no model weights), runs `setup()` exactly as
training would (including the tokenization cache, which the training run then reuses) and reports
the files, the record format, record and example counts, drops and truncations, token-length
statistics and the first training example with its trained tokens marked `[[ ... ]]`.

`inspect_overrides(overrides)` / `inspect_data(cfg)` return an `InspectReport`; `render_report`
turns it into text, `report.to_dict()` into plain data.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_stages.data.describe import TRAINED_CLOSE, TRAINED_OPEN
from llm_stages.data.sources import TEXT_SUFFIXES, data_suffix, raise_error, read_configured
from llm_stages.errors import ConfigError


@dataclass
class InspectReport:
    stage: str
    datamodule: str  # class name of the stage's DataModule
    files: list[dict]  # {"split": "train" | "val" | "source" (data.sources), "path": str, "records": int, "unit": "records" | "documents"}
    val_from: str  # "file" | "held out (data.val_ratio=...)" | "none"
    format: str  # sharegpt, alpaca, ..., prompt_pair, ..., text
    format_from: str  # "detected" | "data.format"
    train_examples: int
    val_examples: int
    stats: dict[str, int]  # the DataModule's drop / truncation / per-source counts
    lengths: dict[str, dict]  # e.g. "sequence", "trained" (pairs: "chosen ...", "rejected ...") -> min/mean/p50/p95/max
    sample: dict[str, str]  # "example" (SFT), "chosen"/"rejected" (pairs) or "block" (PT) -> rendered text
    sample_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# -- entry points ---------------------------------------------------------------------------------

def inspect_overrides(overrides: list[str]) -> InspectReport:
    """Compose the config `python -m llm_stages <overrides>` would run (without creating its run
    directory) and inspect its data."""
    from llm_stages.config import compose

    with tempfile.TemporaryDirectory(prefix="llm_stages-inspect-") as out:
        cfg = compose(list(overrides), output_dir=out)
        return inspect_data(cfg)


def inspect_data(cfg: DictConfig) -> InspectReport:
    data = cfg.data
    sources = data.get("sources")
    if not sources and OmegaConf.is_missing(data, "path"):
        raise ConfigError("data.path is not set; pass data.path=<file> (or data.sources=[...])")
    from llm_stages.data.demo import ensure_configured

    ensure_configured(data)  # the demo files, written on first use as the DataModule's prepare_data does

    # Read the training file(s) first: a malformed file fails here, before the slow imports.
    train_paths = [Path(str(s["path"])) for s in sources] if sources else [Path(str(data.path))]
    files = [_file_entry("source" if sources else "train", p, data) for p in train_paths]

    from hydra.utils import instantiate

    from llm_stages.models import add_vocabulary, load_tokenizer, vocabulary_tokens

    tokenizer = load_tokenizer(cfg.model)
    add_vocabulary(tokenizer, vocabulary_tokens(cfg.model))  # as training does (there with the embeddings resized)
    dm = instantiate(cfg.datamodule, data=data, tokenizer=tokenizer, seed=cfg.seed, _recursive_=False)
    dm.setup()

    if dm.val_path is not None:
        files.append(_file_entry("val", dm.val_path, data))
        val_from = "file"
    elif dm.val_set:
        val_from = f"held out (data.val_ratio={data.get('val_ratio')})"
    else:
        val_from = "none"
    fmt, fmt_from = dm.record_format()
    description = dm.describe()
    return InspectReport(
        stage=str(cfg.stage.name), datamodule=type(dm).__name__, files=files, val_from=val_from, format=fmt,
        format_from=fmt_from, train_examples=len(dm.train_set), val_examples=len(dm.val_set), stats=dict(dm.stats),
        lengths=description.lengths, sample=description.sample, sample_note=description.note)


# -- pieces ---------------------------------------------------------------------------------------

def render_report(report: InspectReport) -> str:
    """The report as the text the CLI prints."""
    lines = [f"stage:      {report.stage} ({report.datamodule})"]
    for f in report.files:
        label = "source:" if f["split"] == "source" else f"{f['split']} data:"
        lines.append(f"{label:<11} {_show_path(f['path'])} ({f['records']} {f['unit']})")
    if report.val_from != "file":
        lines.append(f"val data:   {report.val_from}")
    lines.append(f"format:     {report.format} ({report.format_from})")
    lines.append(f"examples:   {report.train_examples} train / {report.val_examples} val")
    stats = ", ".join(f"{k}={v}" for k, v in report.stats.items())
    lines.append(f"stats:      {stats or 'nothing dropped or truncated'}")

    title = f"tokens per train example ({report.train_examples})"
    width = max(len(title), *(2 + len(name) for name in report.lengths))
    lines += ["", f"{title:<{width}}" + "".join(f"{h:>8}" for h in ("min", "mean", "p50", "p95", "max"))]
    for name, s in report.lengths.items():
        lines.append(f"{'  ' + name:<{width}}{s['min']:>8}{s['mean']:>8.1f}{s['p50']:>8}{s['p95']:>8}{s['max']:>8}")

    marks = "" if "block" in report.sample or "prompt" in report.sample else f"; {TRAINED_OPEN} {TRAINED_CLOSE} marks trained tokens"
    lines += ["", f"first train example ({report.sample_note}{marks}):"]
    for name, text in report.sample.items():
        if len(report.sample) > 1:
            lines.append(f"--- {name}")
        lines.append(text)
    return "\n".join(lines)


def _file_entry(split: str, path: Path, data) -> dict:
    if path.is_file() and data_suffix(path) in TEXT_SUFFIXES:
        from llm_stages.data.kinds.text import read_text_documents

        return {"split": split, "path": str(path), "records": len(read_text_documents(path)), "unit": "documents"}
    skip = data.get("on_bad_record") == "skip"
    records = read_configured(path, data, val=split == "val", on_bad_line=(lambda e: None) if skip else raise_error)
    return {"split": split, "path": str(path), "records": len(records), "unit": "records"}


def _show_path(path: str) -> str:
    """Paths under the current directory relative to it, others as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        return path
