"""Atomic Hugging Face export: the next stage loads `<run>/export` with `model.path=`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def export_hf(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, never leaving a half-written export:
    everything is written to a temporary sibling directory that is then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
