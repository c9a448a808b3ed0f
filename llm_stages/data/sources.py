"""Where records come from: a file, a folder of files, a `save_to_disk` folder or a Hub dataset.

`read_records(path)` returns plain records with the place each came from, following HF `datasets`'
rules for what is a data file, with content (not the extension) deciding what a file holds:

- JSON: one array of records *or* JSON Lines, whatever the extension (`.json`, `.jsonl`, `.ndjson`);
  a line may be an object or a bare list (a conversation); `data.field` picks the list of records
  inside a top-level object.
- compressed files (`.gz`, `.bz2`, `.xz`, `.zst`, told apart by their first bytes);
- UTF-8 with or without a BOM, UTF-16/32 marked by a BOM; anything else is one clear error;
- `.csv` / `.tsv` (cells are text; `line` is the row's line in the file), `.parquet`, `.arrow`;
- a folder: a `save_to_disk` folder, a dataset repository (README `configs:`), or data files
  (split by their names as the Hub does: `train*`, `test*`, `validation*`; else all of them);
- anything else that is not on disk is a dataset name for `datasets.load_dataset` (offline cache
  honoured; one line when it is not cached).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from llm_stages.errors import DataFormatError


class Record(NamedTuple):
    path: str
    line: int  # 1-based line (JSON Lines, CSV, text) or record number (JSON array, table row)
    data: Any


# A reader calls this with each unreadable line (malformed JSON, ...): raise to stop, return to skip.
OnBadLine = Callable[[DataFormatError], None]


def raise_error(error: DataFormatError) -> None:
    raise error


JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".arrow"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zstd"}
DATA_SUFFIXES = JSON_SUFFIXES | TABLE_SUFFIXES | TEXT_SUFFIXES


def data_suffix(path: Path) -> str:
    """The data suffix under any compression suffix: `a.jsonl.gz` -> `.jsonl`."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


# -- bytes -> text --------------------------------------------------------------------------------

_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its first bytes say it is gzip/bz2/xz/zstd."""
    raw = path.read_bytes()
    kind = next((name for magic, name in _MAGIC if raw.startswith(magic)), None)
    if kind is None:
        return raw
    try:
        if kind == "gzip":
            return gzip.decompress(raw)
        if kind == "bz2":
            return bz2.decompress(raw)
        if kind == "xz":
            return lzma.decompress(raw)
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
            return reader.read()
    except Exception as e:  # a truncated or corrupt archive
        raise DataFormatError(path, f"cannot decompress ({kind}): {e}") from None


_BOMS = [(b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")]


def read_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is dropped) or UTF-16/32 with a BOM; anything else is refused
    in one line that says where the first undecodable byte is."""
    raw = read_bytes(path)
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        if b"\x00" in raw[:4096]:
            why = "is binary, not text (NUL bytes); expected UTF-8 text, or a .parquet/.arrow table"
        else:
            why = (f"is not {encoding.upper()} text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                   "re-save it as UTF-8 (e.g. `iconv -f <encoding> -t utf-8`)")
        raise DataFormatError(path, why, line=line) from None


def check_file(path: Path) -> None:
    """A clear DataFormatError for a path that is missing, not a file, or empty."""
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if not path.is_file():
        raise DataFormatError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "file is empty")


# -- files ----------------------------------------------------------------------------------------

def read_json_file(path: Path, *, field: str | None = None, on_bad_line: OnBadLine = raise_error) -> list[Record]:
    """A JSON array of records, or JSON Lines (objects or arrays), whichever the text holds."""
    text = read_text(path)
    body = text.lstrip()
    if not body:
        raise DataFormatError(path, "no records in file")
    if body[0] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            # Several values ("Extra data") or some line that is a value on its own: JSON Lines, read
            # line by line (so a bad line can be skipped); else one broken JSON document.
            lines = [line for line in text.splitlines()[:50] if line.strip()]
            if e.msg != "Extra data" and not (len(lines) > 1 and any(_parses(line) for line in lines)):
                raise DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
            whole = None
        if whole is not None:
            if field is not None:
                if not isinstance(whole, dict) or not isinstance(whole.get(field), list):
                    keys = sorted(whole)[:8] if isinstance(whole, dict) else "a JSON array"
                    raise DataFormatError(path, f"data.field={field}: no list of records under that key ({keys})")
                whole = whole[field]
            if isinstance(whole, dict):
                containers = [k for k, v in whole.items() if isinstance(v, list) and v
                              and all(isinstance(x, dict) and not _is_message(x) for x in v)]
                if containers and len(whole) <= 3:
                    raise DataFormatError(path, f"holds one JSON object with a list of records under "
                                          f"{containers[0]!r}; set data.field={containers[0]}")
                return [Record(str(path), 1, whole)]  # one record (JSON Lines of one line)
            if isinstance(whole, list):
                if whole and all(_is_message(m) for m in whole):
                    return [Record(str(path), 1, whole)]  # the whole file is one conversation
                return [Record(str(path), i + 1, r) for i, r in enumerate(whole)]
    return list(_json_lines(path, text, on_bad_line))


def _is_message(value) -> bool:
    return isinstance(value, dict) and ("role" in value or "from" in value)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _json_lines(path: Path, text: str, on_bad_line: OnBadLine) -> Iterator[Record]:
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield Record(str(path), i, json.loads(raw))
        except json.JSONDecodeError as e:
            on_bad_line(DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=i))


def read_csv_file(path: Path, delimiter: str) -> list[Record]:
    """Rows of a CSV/TSV file as {header: text}; `line` is the row's first line in the file."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    records, line = [], 2  # the header is line 1
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataFormatError(path, f"{len(reader.fieldnames or [])} columns in the header, more in this row",
                                      line=line)
            records.append(Record(str(path), line, {k: v for k, v in row.items() if v is not None}))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataFormatError(path, f"invalid CSV: {e}", line=reader.line_num) from None
    return records


def read_table_file(path: Path, kind: str) -> list[Record]:
    """Rows of a .parquet / .arrow file through HF `datasets`; `line` is the 1-based row number."""
    import datasets

    try:
        if kind == "arrow":
            try:
                table = datasets.Dataset.from_file(str(path))
            except Exception:  # the Arrow IPC file format rather than datasets' stream format
                table = datasets.load_dataset("arrow", data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow errors: report them against the file
        raise DataFormatError(path, f"cannot read as {kind}: {_first_line(e)}") from None
    return [Record(str(path), i + 1, row) for i, row in enumerate(table)]


def read_text_lines(path: Path) -> list[Record]:
    """A text file as HF's `text` loader reads it: one record {"text": line} per non-empty line."""
    return [Record(str(path), i, {"text": line}) for i, line in enumerate(read_text(path).splitlines(), start=1)
            if line.strip()]


def read_file(path: Path, *, field: str | None = None, on_bad_line: OnBadLine = raise_error) -> list[Record]:
    check_file(path)
    suffix = data_suffix(path)
    if suffix == ".csv":
        return read_csv_file(path, ",")
    if suffix == ".tsv":
        return read_csv_file(path, "\t")
    if suffix in (".parquet", ".arrow"):
        return read_table_file(path, suffix[1:])
    if suffix in TEXT_SUFFIXES:
        return read_text_lines(path)
    return read_json_file(path, field=field, on_bad_line=on_bad_line)


# -- folders and dataset names --------------------------------------------------------------------

SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def split_of(relative: str) -> str | None:
    """The split a data file belongs to by its name, as the Hub's default data-files patterns say."""
    for split, words in SPLIT_NAMES.items():
        for word in words:
            if re.search(rf"(^|[-_./ \\]){word}([-_./ \\0-9]|$)", relative.lower()):
                return split
    return None


def data_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and data_suffix(p) in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and p.name.lower() not in ("readme.md",))
    if not files:
        raise DataFormatError(folder, f"no data files in the folder (looked for {', '.join(sorted(DATA_SUFFIXES))})")
    named = {p: split_of(str(p.relative_to(folder))) for p in files}
    if not any(named.values()):
        return files
    chosen = [p for p, s in named.items() if s == _canonical_split(split)]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise DataFormatError(folder, f"no data files for split {split!r} (found splits {found}); set data.split")
    return chosen


def _canonical_split(split: str) -> str:
    return next((name for name, words in SPLIT_NAMES.items() if split.lower() in words), split)


def read_records(path: str | Path, *, split: str = "train", subset: str | None = None, field: str | None = None,
                 on_bad_line: OnBadLine = raise_error) -> list[Record]:
    """Every record at `path` (a file, a folder, or a dataset name), in order."""
    path = Path(str(path))
    if path.is_file():
        records = read_file(path, field=field, on_bad_line=on_bad_line)
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            records = _from_disk(path, split)
        elif _is_dataset_repo(path) or subset:
            records = _load_dataset(str(path), split, subset)
        else:
            records = [r for f in data_files(path, split) for r in read_file(f, field=field, on_bad_line=on_bad_line)]
    elif _looks_like_dataset_name(str(path)):
        records = _load_dataset(str(path), split, subset)
    else:
        raise DataFormatError(path, "file not found")
    if not records:
        raise DataFormatError(path, "no records in file")
    return records


def read_configured(path: str | Path, data, *, val: bool = False, on_bad_line: OnBadLine = raise_error) -> list[Record]:
    """The records at `path` as the data config selects them: `data.split` (`data.val_split`, when
    set, for validation), `data.subset`, `data.field`."""
    split = (data.get("val_split") if val else None) or data.get("split") or "train"
    return read_records(path, split=split, subset=data.get("subset"), field=data.get("field"), on_bad_line=on_bad_line)


def _is_dataset_repo(folder: Path) -> bool:
    readme = folder / "README.md"
    return (folder / "dataset_infos.json").is_file() or (
        readme.is_file() and re.search(r"^configs:", readme.read_text(encoding="utf-8", errors="replace"), re.M) is not None)


def _looks_like_dataset_name(name: str) -> bool:
    """`owner/name` or `name`, as the Hub spells dataset ids (no suffix, not an absolute path)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and data_suffix(Path(name)) not in DATA_SUFFIXES


def _from_disk(folder: Path, split: str) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataFormatError(folder, f"cannot read as a save_to_disk dataset: {_first_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataFormatError(folder, f"no split {split!r} (splits: {sorted(loaded)}); set data.split")
        loaded = loaded[split]
    return [Record(str(folder), i + 1, row) for i, row in enumerate(loaded)]


def _load_dataset(name: str, split: str, subset: str | None) -> list[Record]:
    """`datasets.load_dataset(name, subset, split=split)`, with its failures in one line."""
    import datasets

    where = f"{name}[{subset + ', ' if subset else ''}{split}]"
    try:
        table = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        text = _first_line(e)
        if any(s in text for s in ("offline", "Couldn't reach", "ConnectionError", "couldn't be found on the Hugging",
                                   "doesn't exist on the Hub", "cannot be found", "not found")):
            why = (f"not a local file or folder, and the Hub dataset is not in the local cache ({text}); "
                   f"download it where there is network (`huggingface-cli download --repo-type dataset {name}`, "
                   "with HF_HUB_OFFLINE unset) or set data.path to a local copy")
        else:
            why = f"cannot load with datasets.load_dataset: {text} (set data.subset / data.split?)"
        raise DataFormatError(where, why) from None
    return [Record(where, i + 1, row) for i, row in enumerate(table)]


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def fingerprint(path: str | Path) -> bytes:
    """Bytes that change when the data at `path` changes (the tokenization cache's key)."""
    path = Path(str(path))
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        parts = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = f.stat()
            parts.append(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}")
        return "\n".join(parts).encode()
    return f"dataset:{path}".encode()  # a Hub dataset name: keyed by name (the cache holds one revision)
