"""What a stage's data becomes before any training: `python -m llm_stages.data inspect [overrides]`.

Builds only the tokenizer and the stage's DataModule (no model weights), runs `setup()` exactly as
training would (including the tokenization cache, which the training run then reuses) and reports
the files, the record format, record and example counts, drops and truncations, token-length
statistics and the first training example with its trained tokens marked `[[ ... ]]`.

`inspect_overrides(overrides)` / `inspect_data(cfg)` return an `InspectReport`; `render_report`
turns it into text, `report.to_dict()` into plain data.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_stages.data import formats
from llm_stages.data.sources import TEXT_SUFFIXES, data_suffix, raise_error, read_configured
from llm_stages.errors import ConfigError, DataFormatError

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
PT_SAMPLE_TOKENS = 200


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
    demo = data.get("demo")
    if demo:  # the demo files are written on first use, as the DataModule's prepare_data does
        from llm_stages.data.demo import ensure_demo_data

        ensure_demo_data(demo["dir"], seed=demo["seed"])

    # Read the training file(s) first: a malformed file fails here, before the slow imports.
    train_paths = [Path(str(s["path"])) for s in sources] if sources else [Path(str(data.path))]
    files = [_file_entry("source" if sources else "train", p, data) for p in train_paths]

    from hydra.utils import instantiate

    from llm_stages.data.datamodule import PairDataModule, PromptDataModule, PTDataModule
    from llm_stages.data.render import prompt_length
    from llm_stages.models import load_tokenizer, vocabulary_tokens

    tokenizer = load_tokenizer(cfg.model)
    tokenizer.add_tokens(vocabulary_tokens(cfg.model))  # as training does (there with the embeddings resized)
    dm = instantiate(cfg.datamodule, data=data, tokenizer=tokenizer, seed=cfg.seed, _recursive_=False)
    dm.setup()

    if dm.val_path is not None:
        files.append(_file_entry("val", dm.val_path, data))
        val_from = "file"
    elif dm.val_set:
        val_from = f"held out (data.val_ratio={data.get('val_ratio')})"
    else:
        val_from = "none"

    if isinstance(dm, PTDataModule):
        fmt, fmt_from = "text", "detected"
    elif isinstance(dm, PromptDataModule):
        fmt, fmt_from = _record_format(train_paths[0], _prompt_format, data)
    else:
        detect = formats.detect_pair_format if isinstance(dm, PairDataModule) else formats.detect_conversation_format
        fmt, fmt_from = _record_format(train_paths[0], detect, data)

    report = InspectReport(
        stage=str(cfg.stage.name), datamodule=type(dm).__name__, files=files, val_from=val_from, format=fmt,
        format_from=fmt_from, train_examples=len(dm.train_set), val_examples=len(dm.val_set), stats=dict(dm.stats),
        lengths={}, sample={})
    if isinstance(dm, PromptDataModule):
        report.lengths["prompt"] = length_stats([len(e.input_ids) for e in dm.train_set])
        first = dm.train_set[0]
        report.sample["prompt"] = tokenizer.decode(first.input_ids, skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False)
        report.sample_note = (f"{len(first.input_ids)} prompt tokens; reference answer {first.answer!r}; "
                              f"{sum(e.answer is not None for e in dm.train_set)} of {len(dm.train_set)} prompts have one")
    elif isinstance(dm, PairDataModule):
        for side in ("chosen", "rejected"):
            examples = [getattr(p, side) for p in dm.train_set]
            report.lengths[f"{side} sequence"] = length_stats([len(e.input_ids) for e in examples])
            report.lengths[f"{side} trained"] = length_stats([_trained(e.labels) for e in examples])
            report.sample[side] = mark_trained(tokenizer, *_ids_labels(getattr(dm.train_set[0], side)))
        first = dm.train_set[0].chosen
        report.sample_note = (f"prompt {prompt_length(first.labels)} tokens, chosen {_trained(first.labels)} trained, "
                              f"rejected {_trained(dm.train_set[0].rejected.labels)} trained")
    else:
        report.lengths["sequence"] = length_stats([len(e.input_ids) for e in dm.train_set])
        report.lengths["trained"] = length_stats([_trained(e.labels) for e in dm.train_set])
        first = dm.train_set[0]
        if isinstance(dm, PTDataModule):
            shown = list(first.input_ids[:PT_SAMPLE_TOKENS])
            report.sample["block"] = tokenizer.decode(shown, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            report.sample_note = f"first {len(shown)} of {len(first.input_ids)} tokens; every token is trained"
        else:
            report.sample["example"] = mark_trained(tokenizer, *_ids_labels(first))
            report.sample_note = f"{len(first.input_ids)} tokens, {_trained(first.labels)} trained"
            if getattr(dm, "packing", False):
                report.sample_note += f"; a packed row of {len(first.doc_lengths)} conversations"
    return report


# -- pieces ---------------------------------------------------------------------------------------

def length_stats(values: list[int]) -> dict:
    """min / mean / p50 / p95 / max (nearest-rank percentiles) of a list of counts."""
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"min": ordered[0], "mean": sum(ordered) / len(ordered), "p50": pct(50), "p95": pct(95), "max": ordered[-1]}


def mark_trained(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The decoded sequence with each run of trained (labelled) tokens wrapped in `[[` and `]]`."""
    from llm_stages.data.render import IGNORE_INDEX

    parts = []
    for trained, run in itertools.groupby(zip(input_ids, labels), key=lambda t: t[1] != IGNORE_INDEX):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(parts)


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
        return {"split": split, "path": str(path), "records": len(formats.read_text_documents(path)), "unit": "documents"}
    return {"split": split, "path": str(path), "records": len(_records(path, data, val=split == "val")), "unit": "records"}


def _records(path: Path, data, val: bool = False) -> list[formats.Record]:
    skip = data.get("on_bad_record") == "skip"
    return read_configured(path, data, val=val, on_bad_line=(lambda e: None) if skip else raise_error)


def _record_format(path: Path, detect, data) -> tuple[str, str]:
    """`data.format` when set, else the format detected from the first record (the first detectable
    one when bad records are skipped)."""
    fmt = data.get("format")
    if fmt and fmt != "auto":
        return str(fmt), "data.format"
    columns = dict(data.get("columns") or {}) or None
    first_error = None
    for record in _records(path, data):
        try:
            return detect(formats.prepare(record, columns)), "detected"
        except DataFormatError as e:
            if data.get("on_bad_record") != "skip":
                raise
            first_error = first_error or e
    raise first_error


def _prompt_format(record: formats.Record) -> str:
    """Which RL prompt layout a record has (as `formats.prompt_record` reads it)."""
    formats.prompt_record(record)  # raises the clear error for a record without a prompt
    keys = record.data
    return next((k for k in formats.PROMPT_KEYS if k in keys), "messages" if "messages" in keys else "sharegpt")


def _ids_labels(example) -> tuple[list[int], list[int]]:
    return list(example.input_ids), list(example.labels)


def _trained(labels) -> int:
    from llm_stages.data.render import num_trained_tokens

    return num_trained_tokens(list(labels))


def _show_path(path: str) -> str:
    """Paths under the current directory relative to it, others as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(os.getcwd()).resolve()))
    except ValueError:
        return path
