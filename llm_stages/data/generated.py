"""Generated data files kept in step with what wrote them. A generator writes its files and, beside
them, a `<name>_spec.json` stamp of its settings and format version; the next run reads the stamp and
rewrites the files when it differs (other settings, or an upgrade that changed the generator), instead
of training on files an older version wrote."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llm_stages.training.run_dir import write_text_atomic


def is_current(spec_file: Path, spec: dict, paths: Iterable[Path]) -> bool:
    """True when every one of `paths` exists and `spec_file` records exactly `spec`."""
    try:
        written = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return written == json.loads(json.dumps(spec)) and all(Path(p).exists() for p in paths)


def write_spec(spec_file: Path, spec: dict) -> None:
    """Stamp the files just written with `spec`; written last, so a killed generator leaves no stamp."""
    write_text_atomic(Path(spec_file), json.dumps(spec, sort_keys=True) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """`records` as JSON Lines at `path`, atomically."""
    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
