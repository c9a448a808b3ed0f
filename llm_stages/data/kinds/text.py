"""Text documents (PT): read from plain-text files or `{"text": ...}` records, tokenized with EOS
after each document, concatenated and cut into fixed blocks; every token is trained. Blocks collate
as any causal rows (`collate.collate_causal`)."""

from __future__ import annotations

from pathlib import Path

from llm_stages.data import sources
from llm_stages.data.columns import cannot_tell, prepare
from llm_stages.data.describe import Description, causal_lengths, decode
from llm_stages.data.messages import text_value
from llm_stages.data.render import Example
from llm_stages.data.sources import Record, check_file, read_text
from llm_stages.errors import ConfigError, DataFormatError

SAMPLE_TOKENS = 200  # of the first block, shown by inspect


def text_files(path: Path, split: str) -> list[Path]:
    """`path` as plain-text files (a text file, or a folder of data files that are all text), else []."""
    if path.is_file():
        files = [path]
    elif path.is_dir() and not (path / "state.json").exists() and not (path / "dataset_dict.json").exists():
        files = sources.data_files(path, split)
    else:
        return []
    return files if all(sources.data_suffix(f) in sources.TEXT_SUFFIXES for f in files) else []


def read_text_documents(path: str | Path) -> list[Record]:
    """Documents of a text file (compressed too), separated by one or more blank lines (a file
    without blank lines is one document per line)."""
    path = Path(path)
    check_file(path)
    lines = read_text(path).splitlines()
    has_blank_separators = any(not line.strip() for line in lines)
    docs: list[Record] = []
    current: list[str] = []
    start = 1
    for i, line in enumerate(lines, start=1):
        if not has_blank_separators:
            if line.strip():
                docs.append(Record(str(path), i, line))
            continue
        if line.strip():
            if not current:
                start = i
            current.append(line)
        elif current:
            docs.append(Record(str(path), start, "\n".join(current)))
            current = []
    if current:
        docs.append(Record(str(path), start, "\n".join(current)))
    if not docs:
        raise DataFormatError(path, "no text in file")
    return docs


def text_of(record: Record) -> str:
    """The document text of a text-file document or a `{"text": ...}` record."""
    if isinstance(record.data, str):
        return record.data
    if "text" not in record.data:
        raise cannot_tell(record, "text", "a 'text' field")
    return text_value(record, "text", record.data["text"])


def read_document(record: Record, fmt: str = "auto", columns=None) -> str:
    """The text of a record (this kind's reader, as the DataModule calls every kind's)."""
    return text_of(prepare(record, columns))


def pack_documents(documents: list[list[int]], eos_id: int, block_size: int, remainder: str = "drop") -> list[Example]:
    """Concatenate documents, each followed by EOS, and cut the stream into `block_size` blocks.

    remainder="drop" drops the final partial block (as the seeds and HF run_clm do);
    remainder="pad" keeps it (the collator right-pads it and masks the padding).
    Attention is not masked across document boundaries inside a block (standard packed PT).
    """
    if remainder not in ("drop", "pad"):
        raise ConfigError(f"datamodule.remainder must be 'drop' or 'pad', got {remainder!r}")
    stream: list[int] = []
    for doc in documents:
        stream += doc
        stream.append(eos_id)
    n_full = len(stream) // block_size
    blocks = [stream[k * block_size:(k + 1) * block_size] for k in range(n_full)]
    if remainder == "pad" and len(stream) % block_size:
        blocks.append(stream[n_full * block_size:])
    return [Example(block, list(block)) for block in blocks]


def render_blocks(tokenizer, texts: list[str], path: Path, block_size: int, remainder: str) -> list[Example]:
    """The documents' blocks (see `pack_documents`); at least one, else the error says what to change."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token, which packing puts between documents")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack_documents(ids, eos, block_size, remainder)
    if not blocks:
        raise DataFormatError(path, f"{sum(map(len, ids)) + len(ids)} tokens, fewer than one block "
                              f"(datamodule.block_size={block_size}); lower block_size or use remainder=pad")
    return blocks


def describe(blocks: list[Example], tokenizer) -> Description:
    first = blocks[0]
    shown = list(first.input_ids[:SAMPLE_TOKENS])
    return Description(causal_lengths(blocks), {"block": decode(tokenizer, shown)},
                       f"first {len(shown)} of {len(first.input_ids)} tokens; every token is trained")
