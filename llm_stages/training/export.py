"""Atomic Hugging Face export: the next stage loads `<run>/export` with `model.path=`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llm_stages.training.run_dir import temporary_sibling
from llm_stages.training.sharding import full_state_dict, global_rank


def export_hf(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, never leaving a half-written export:
    everything is written to a temporary sibling directory that is then renamed into place.

    Call it on every rank: a sharded model (FSDP, FSDP2, ZeRO-3) is first gathered into full
    weights, which needs all ranks; global rank 0 alone writes."""
    state_dict = full_state_dict(model)
    out_dir = Path(out_dir)
    if global_rank() != 0:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A kill during the write leaves these behind; the next run's start removes them (remove_stale_temporaries).
    tmp, old = temporary_sibling(out_dir), temporary_sibling(out_dir, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
