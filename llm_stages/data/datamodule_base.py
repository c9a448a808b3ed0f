"""What every DataModule shares: sources and splits, the tokenization cache, the read -> render loop
with its drop counts, resumable loaders of micro-batches, and what `inspect` asks of a DataModule.
One small subclass per record kind (datamodule.py) supplies its kind's reader, rendering,
collation and description."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from llm_stages.data import sources
from llm_stages.data.collate import MicroBatches, ResumableBatchSampler, ResumableDataLoader, collate_causal
from llm_stages.data.columns import check_columns, prepare
from llm_stages.data.describe import Description
from llm_stages.data.render import Example, Rendered
from llm_stages.data.sources import Record
from llm_stages.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

# Why a kind's `render` drops a record (its `Rendered.dropped`), as the load warning says it.
DROP_REASONS = {"identical_pair": "identical pair: chosen equals rejected, no preference to learn",
                "no_trained_tokens": "no reply token left within datamodule.max_length",
                "no_assistant_turn": "no assistant turn to train on",
                "prompt_too_long": "prompt longer than datamodule.max_prompt_length"}


class CausalDataModule(L.LightningDataModule):
    """Reads `data.path` (and a validation source), builds `Example`s with `build_examples`, and
    serves training steps as lists of `grad_accum` micro-batches of `batch_size` sequences."""

    def __init__(self, data, tokenizer, *, batch_size: int = 8, grad_accum: int = 1, val_batch_size: int = 16,
                 num_workers: int = 0, seed: int = 1234, group_by_length: bool = False, length_groups: int = 1,
                 length_group_cost: int = 64):
        super().__init__()
        self.group_by_length = group_by_length
        self.length_groups, self.length_group_cost = length_groups, length_group_cost
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.grad_accum, self.val_batch_size = batch_size, grad_accum, val_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_set: list[Example] = []
        self.val_set: list[Example] = []
        self.stats: dict[str, int] = {}
        self.val_path: Path | None = None
        if batch_size < 1 or grad_accum < 1 or length_groups < 1:
            raise ConfigError("datamodule.batch_size, datamodule.grad_accum and datamodule.length_groups must be >= 1")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set one on the model's tokenizer")
        self._columns(), self._policy()  # data settings that cannot work are refused before anything is read

    # -- subclasses: their kind's reader, rendering, collation and description ------------------
    read = None  # (record, data.format, data.columns) -> the kind's item (a conversation, a pair, ...)
    detect_format = None  # record -> the name of its format, for `record_format`

    def render(self, record: Record, item) -> Rendered:
        """An item as its example (or why it was dropped), with the DataModule's settings."""
        raise NotImplementedError

    def nothing_left(self) -> str:
        """Why no record of a file gave an example (the error's text)."""
        raise NotImplementedError

    def describe(self) -> Description:
        """What `inspect` shows of the training examples (lengths, the first example)."""
        raise NotImplementedError

    def build_examples(self, path: Path, split: str) -> list:
        """Every record of `path` read and rendered; drops and truncations counted in `stats`."""
        examples = [example for _, example in self.rendered_records(path, split)]
        if not examples:
            raise DataFormatError(path, self.nothing_left())
        return examples

    def rendered_records(self, path: Path, split: str):
        """(record, example) for each record of `path` that renders to one (evaluation keeps the
        record beside its example: its id fields); drops and truncations counted in `stats`."""
        first_dropped: dict[str, Record] = {}
        for record, item in self._read_records(path, self.read, split):
            rendered = self.render(record, item)
            if rendered.truncated:
                self._count(f"{split}_truncated")
            if rendered.dropped:
                self._count(f"{split}_dropped_{rendered.dropped}")
                first_dropped.setdefault(rendered.dropped, record)
                continue
            yield record, rendered.example
        for why, record in first_dropped.items():  # one line per reason, loud: nothing is dropped silently
            log.warning("%s: %d records dropped (%s), the first at %s:%d", path, self.stats[f"{split}_dropped_{why}"],
                        DROP_REASONS.get(why, why.replace("_", " ")), record.path, record.line)

    def settings(self) -> dict:
        """Everything besides the file and tokenizer that changes the examples (the cache key)."""
        return {"format": self.data.get("format"), "system_prompt": self.data.get("system_prompt"),
                "on_bad_record": self.data.get("on_bad_record"), "columns": self._columns(),
                **{k: self.data.get(k) for k in ("field", "split", "val_split", "subset") if self.data.get(k) is not None}}

    def _columns(self) -> dict | None:
        columns = self.data.get("columns")
        if not columns:
            return None
        columns = dict(columns)
        check_columns(columns)
        return columns

    @staticmethod
    def example_from_json(item) -> Example:
        return Example(*item)

    # -- tokenization cache ----------------------------------------------------------------------
    CACHE_VERSION = 5  # bumped whenever rendering changes which tokens are trained or what an example holds

    def cached_examples(self, path: Path, split: str) -> list:
        """`build_examples`, cached as JSON under `data.cache_dir` (null: no cache), keyed by the
        file's bytes, the tokenizer (vocabulary and chat template) and `settings()`, so a second
        run with the same inputs starts without tokenizing. Stats (drops, truncations) are cached too."""
        cache_dir = self.data.get("cache_dir")
        if not cache_dir:
            return self.build_examples(path, split)
        file = Path(str(cache_dir)) / f"{type(self).__name__}-{split}-{self._cache_key(path)}.json"
        if file.is_file():
            payload = json.loads(file.read_text(encoding="utf-8"))
            for k, v in payload["stats"].items():
                self.stats[k] = self.stats.get(k, 0) + v
            log.info("data: %s read from the tokenization cache %s", path, file)
            return [self.example_from_json(item) for item in payload["examples"]]
        before = dict(self.stats)
        examples = self.build_examples(path, split)
        stats = {k: v - before.get(k, 0) for k, v in self.stats.items() if v != before.get(k, 0)}
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"examples": examples, "stats": stats}, f, default=str)  # a record field JSON cannot hold: as text
        os.replace(tmp, file)  # concurrent ranks may both write; each write is whole
        return examples

    def _cache_key(self, path: Path) -> str:
        digest = hashlib.sha256()
        digest.update(sources.fingerprint(path))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocabulary = backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        digest.update(vocabulary.encode())
        digest.update(json.dumps([self.CACHE_VERSION, str(self.tokenizer.chat_template), self.tokenizer.eos_token,
                                  self.settings()], sort_keys=True, default=str).encode())
        return digest.hexdigest()[:24]

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from llm_stages.data.demo import ensure_configured

        ensure_configured(self.data)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        self.prepare_data()  # idempotent; covers callers that skip prepare_data (tests, other ranks)
        sources, train_path = self.data.get("sources"), self.train_path()
        examples = self._mix(sources) if sources else self.cached_examples(train_path, "train")
        # The validation file actually used (None: held out from training, or no validation).
        self.val_path = self._val_path(train_path) if not sources or self.data.get("val_path") != "auto" else None
        if self.val_path is not None:
            self.train_set, self.val_set = examples, self.cached_examples(self.val_path, "val")
        else:
            self.train_set, self.val_set = self._hold_out(examples, float(self.data.get("val_ratio") or 0.0))
        world = self.trainer.world_size if self.trainer else 1
        if len(self.train_set) < self.batch_size * self.grad_accum * world:
            raise ConfigError(f"{train_path}: {len(self.train_set)} training examples, fewer than one step needs "
                              f"(datamodule.batch_size={self.batch_size} x grad_accum={self.grad_accum} x {world} devices)")
        log.info("data: %d train / %d val examples from %s; %s", len(self.train_set), len(self.val_set), train_path,
                 ", ".join(f"{k}={v}" for k, v in self.stats.items()) or "nothing dropped or truncated")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableBatchSampler(
            len(self.train_set), self.batch_size * self.grad_accum, seed=self.seed,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
            lengths=[self.example_length(e) for e in self.train_set] if self.group_by_length else None)
        return ResumableDataLoader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                                   collate_fn=MicroBatches(self.collate_one, self.batch_size, length=self.example_length,
                                                           max_groups=self._length_groups(trainer),
                                                           group_cost=self.length_group_cost))

    def _length_groups(self, trainer) -> int:
        """Micro-batches split by length in single-process training only: ranks would split their
        slices into different numbers of passes, and every pass is a collective under DDP (buffer
        broadcast) and FSDP/ZeRO (weight gathering)."""
        if self.length_groups > 1 and trainer is not None and trainer.world_size > 1:
            log.info("datamodule.length_groups=%d not used with %d processes: each micro-batch is one forward pass",
                     self.length_groups, trainer.world_size)
            return 1
        return self.length_groups

    def val_dataloader(self) -> DataLoader:
        if not self.val_set:
            return []
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        shard, size = self.val_set[rank::world], self.val_batch_size
        batches = [list(range(i, min(i + size, len(shard)))) for i in range(0, len(shard), size)]
        # Every rank runs as many batches as the one with the most examples: under sharded training
        # (FSDP, ZeRO-3) each forward is a collective, and a rank with a batch more would wait forever.
        # Shards differ by at most one example, so at most the last batch needs splitting in two (which
        # cannot help with val_batch_size=1 or fewer examples than ranks).
        most = math.ceil(math.ceil(len(self.val_set) / world) / size)
        if len(batches) < most and batches and len(batches[-1]) > 1:
            last = batches.pop()
            batches += [last[:len(last) // 2], last[len(last) // 2:]]
        return DataLoader(shard, batch_sampler=batches, num_workers=self.num_workers, collate_fn=self.collate_one)

    @staticmethod
    def example_length(example) -> int:
        return len(example.input_ids)

    def collate_one(self, examples):
        """One micro-batch of examples -> tensors."""
        return collate_causal(examples, self.tokenizer.pad_token_id)

    # -- what a stage computes once per example (DPO's and KTO's reference log-probs) -------------
    def splits(self) -> dict[str, list]:
        return {"train": self.train_set, "val": self.val_set}

    def reference_batches(self, split: str):
        """Every example of `split` ("train" | "val") in index order, collated `val_batch_size` at a time."""
        examples = self.splits()[split]
        for start in range(0, len(examples), self.val_batch_size):
            yield self.collate_one(examples[start:start + self.val_batch_size])

    # -- what inspect asks ------------------------------------------------------------------------
    def train_path(self) -> Path:
        """The training file (the first of `data.sources`)."""
        sources = self.data.get("sources")
        return Path(str(sources[0]["path"] if sources else self.data["path"]))

    def record_format(self) -> tuple[str, str]:
        """(format, "data.format") when set, else (the format detected from the first training
        record, "detected"), the first detectable one when bad records are skipped."""
        fmt = self.data.get("format")
        if fmt and fmt != "auto":
            return str(fmt), "data.format"
        skip, first_error = self._policy() == "skip", None
        records = sources.read_configured(self.train_path(), self.data,
                                          on_bad_line=(lambda e: None) if skip else sources.raise_error)
        for record in records:
            try:
                return self.detect_format(prepare(record, self._columns())), "detected"
            except DataFormatError as e:
                if not skip:
                    raise
                first_error = first_error or e
        raise first_error

    # -- helpers ---------------------------------------------------------------------------------
    def _val_path(self, train_path: Path) -> Path | None:
        if self.data.get("val_split"):  # another split of the same dataset
            return train_path
        val = self.data.get("val_path")
        if val in (None, "", "none"):
            return None
        if val != "auto":
            return Path(str(val))
        sibling = train_path.with_name(re.sub(r"_train(?=\.[^.]+$)", "_val", train_path.name))
        return sibling if sibling != train_path and sibling.exists() else None

    def _mix(self, sources) -> list:
        """Several sources mixed by weight (the seeds' bins): source i contributes
        round(total * w_i / sum(w)) examples, drawn without replacement while it has enough and
        cycled through shuffled copies beyond that; `data.mix_size` sets the total (default: the
        sum of the sources' sizes). Deterministic under the seed; per-source counts go to stats."""
        built = [self.cached_examples(Path(str(src["path"])), "train") for src in sources]
        weights = [float(src.get("weight", 1.0)) for src in sources]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.sources weights must be >= 0 with a positive sum, got {weights}")
        total = int(self.data.get("mix_size") or sum(len(b) for b in built))
        generator = torch.Generator().manual_seed(self.seed)
        mixed = []
        for src, examples, weight in zip(sources, built, weights):
            want = round(total * weight / sum(weights))
            copies = -(-want // len(examples))  # ceil: enough shuffled passes over the source
            order = torch.cat([torch.randperm(len(examples), generator=generator) for _ in range(max(copies, 1))])
            mixed += [examples[i] for i in order[:want].tolist()]
            self.stats[f"source:{Path(str(src['path'])).name}"] = want
        return mixed

    def _hold_out(self, examples: list[Example], fraction: float):
        n_val = int(len(examples) * fraction)
        if n_val == 0:
            return examples, []
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val_ids = set(order[:n_val])
        return ([e for i, e in enumerate(examples) if i not in val_ids],
                [e for i, e in enumerate(examples) if i in val_ids])

    def _policy(self) -> str:
        policy = self.data.get("on_bad_record") or "error"
        if policy not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_record must be 'error' or 'skip', got {policy!r}")
        return policy

    def _records(self, path: Path, split: str) -> list[Record]:
        """The records at `path` (file, folder or dataset; see sources.py). An unreadable line stops
        the run, or with data.on_bad_record=skip is skipped, counted and named (the first few)."""
        policy = self._policy()
        return sources.read_configured(path, self.data, val=split == "val",
                                       on_bad_line=lambda e: self._bad_record(e, policy, split))

    def _read_records(self, path: Path, reader, split: str):
        """(record, reader(record, format, columns)) for each record of `path`. A bad record stops the
        run, or with data.on_bad_record=skip is skipped, counted and (the first few) named in the log."""
        policy, fmt, columns = self._policy(), self.data.get("format") or "auto", self._columns()
        for record in self._records(path, split):
            try:
                record = prepare(record, columns)
                yield record, reader(record, fmt, None)
            except DataFormatError as e:
                self._bad_record(e, policy, split)

    def _bad_record(self, error: DataFormatError, policy: str, split: str) -> None:
        if policy == "error":
            raise error
        self._count(f"{split}_skipped_bad_record")
        if self.stats[f"{split}_skipped_bad_record"] <= 3:
            log.warning("skipped: %s", error)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

