"""The DataModules, one per record kind — PT (text), SFT (conversations), pairs (RM, DPO), unpaired
feedback (KTO), prompts (PPO, GRPO) — each reading, rendering, collating and describing through its kind's module in
`llm_stages/data/kinds/`; what they share is `CausalDataModule` (datamodule_base.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llm_stages.data.datamodule_base import CausalDataModule
from llm_stages.data.describe import Description
from llm_stages.data.kinds import conversation, pair, prompt, shared_pair, text, unpaired
from llm_stages.data.render import Example, Rendered, ensure_chat_template
from llm_stages.data.sources import Record
from llm_stages.errors import ConfigError

log = logging.getLogger(__name__)


class PTDataModule(CausalDataModule):
    """Pretraining: `.txt` (blank-line separated documents) or `.json`/`.jsonl` with a `text` field."""

    def __init__(self, data, tokenizer, *, block_size: int = 1024, remainder: str = "drop", **kwargs):
        super().__init__(data, tokenizer, **kwargs)
        self.block_size, self.remainder = block_size, remainder

    def settings(self) -> dict:
        return {**super().settings(), "block_size": self.block_size, "remainder": self.remainder}

    def build_examples(self, path: Path, split: str) -> list[Example]:
        text_files = text.text_files(path, self.data.get("split") or "train")
        if text_files:  # documents separated by blank lines, file by file
            texts = [r.data for f in text_files for r in text.read_text_documents(f)]
        else:  # records with a text field
            texts = [document for _, document in self._read_records(path, text.read_document, split)]
        return text.render_blocks(self.tokenizer, texts, path, self.block_size, self.remainder)

    def record_format(self) -> tuple[str, str]:
        return "text", "detected"

    def describe(self) -> Description:
        return text.describe(self.train_set, self.tokenizer)


class SFTDataModule(CausalDataModule):
    """Supervised conversations (sharegpt, alpaca, messages), assistant turns trained."""

    read = staticmethod(conversation.read_conversation)
    detect_format = staticmethod(conversation.detect_format)

    def __init__(self, data, tokenizer, *, max_length: int = 512, packing: bool = False,
                 completion_only_loss: bool = True, **kwargs):
        super().__init__(data, tokenizer, **kwargs)
        self.max_length, self.packing = max_length, packing
        self.completion_only_loss = bool(completion_only_loss)
        ensure_chat_template(tokenizer)

    def settings(self) -> dict:
        return {**super().settings(), "max_length": self.max_length, "completion_only_loss": self.completion_only_loss}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        super().setup(stage)
        if self.packing:  # several conversations per row, in a seeded random order
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_examples = len(self.train_set)
            self.train_set = conversation.pack_examples([self.train_set[i] for i in order], self.max_length)
            self.val_set = conversation.pack_examples(self.val_set, self.max_length)
            log.info("data: packed %d conversations into %d rows of <= %d tokens", n_examples, len(self.train_set),
                     self.max_length)

    def render(self, record: Record, item: conversation.Conversation) -> Rendered:
        return conversation.render(self.tokenizer, item, system_prompt=self.data.get("system_prompt"),
                                   max_length=self.max_length, completion_only_loss=self.completion_only_loss)

    def nothing_left(self) -> str:
        return f"no record has an assistant token left to train within datamodule.max_length={self.max_length}"

    def collate_one(self, examples):
        if self.packing:
            return conversation.collate_packed(examples, self.tokenizer.pad_token_id)
        return super().collate_one(examples)

    def describe(self) -> Description:
        return conversation.describe(self.train_set, self.tokenizer)


class PairDataModule(CausalDataModule):
    """Preference pairs (RM, DPO): a shared prompt and a chosen and a rejected reply; only the
    replies are labelled. `batch_size` counts pairs.

    `share_prompt` (auto | true | false): forward each pair's prompt once, `[prompt, chosen, rejected]`
    in one row (llm_stages.data.kinds.shared_pair); auto decides from the data (`setup`), and the
    stage turns it off where its model cannot take the 4-D mask (`stop_sharing`). `pack_pairs`:
    several shared pairs per row where they fit in the micro-batch's longest."""

    read = staticmethod(pair.read_pair)
    detect_format = staticmethod(pair.detect_format)
    example_from_json = staticmethod(pair.example_from_json)

    def __init__(self, data, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256,
                 share_prompt: str | bool = "auto", share_prompt_min_saving: float = 0.2, pack_pairs: bool = True,
                 too_long: str = "truncate", **kwargs):
        super().__init__(data, tokenizer, **kwargs)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.too_long = str(too_long).lower()
        if self.too_long not in pair.TOO_LONG_SETTINGS:
            raise ConfigError(f"datamodule.too_long={too_long}: expected one of {', '.join(pair.TOO_LONG_SETTINGS)} "
                              "(truncate: cut the prompt from the left, then the replies; drop: skip the pair, "
                              "as TRL's RewardTrainer does)")
        self.share_prompt = str(share_prompt).lower()
        if self.share_prompt not in shared_pair.SHARE_PROMPT_SETTINGS:
            raise ConfigError(f"datamodule.share_prompt={share_prompt}: expected one of auto, true, false")
        self.share_prompt_min_saving, self.pack_pairs = float(share_prompt_min_saving), bool(pack_pairs)
        self.shares_prompt: bool | None = None  # decided once, in setup, from the data
        if max_prompt_length >= max_length:  # refused before any data is read: no room left for the replies
            raise ConfigError(f"datamodule.max_prompt_length={max_prompt_length} leaves no room for the replies within "
                              f"datamodule.max_length={max_length}; set max_prompt_length below max_length "
                              f"(e.g. datamodule.max_prompt_length={max_length // 2})")
        ensure_chat_template(tokenizer)

    def settings(self) -> dict:
        return {**super().settings(), "max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "too_long": self.too_long}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        # Number each split's pairs so per-pair values (cached reference log-probs) can be looked up.
        self.train_set = [p._replace(index=i) for i, p in enumerate(self.train_set)]
        self.val_set = [p._replace(index=i) for i, p in enumerate(self.val_set)]
        if self.shares_prompt is not None:  # decided already (setup runs for validate and for fit)
            return
        self.shares_prompt, why = shared_pair.decide_share_prompt(self.share_prompt, self.train_set,
                                                                  self.share_prompt_min_saving)
        log.info("data: prompts %s: %s", "forwarded once per pair" if self.shares_prompt else "not shared", why)

    def stop_sharing(self, reason: str) -> None:
        """Back to one row per sequence (the stage's model cannot take the shared layout); refused
        when the config asked for sharing explicitly."""
        if self.share_prompt == "true":
            raise ConfigError(f"datamodule.share_prompt=true cannot be used here: {reason}; set "
                              "datamodule.share_prompt=auto or false")
        if self.shares_prompt:
            log.info("data: prompts not shared after all: %s", reason)
        self.shares_prompt = False

    def example_length(self, example: pair.PairExample) -> int:
        """What length grouping sorts by: the shared row, or the longer of the two sequences."""
        return shared_pair.shared_length(example) if self.shares_prompt else pair.length(example)

    def render(self, record: Record, item: pair.Pair) -> Rendered:
        return pair.render(self.tokenizer, record, item, system_prompt=self.data.get("system_prompt"),
                           max_length=self.max_length, max_prompt_length=self.max_prompt_length, too_long=self.too_long)

    def nothing_left(self) -> str:
        return f"no pair has reply tokens left within datamodule.max_length={self.max_length}"

    def collate_one(self, pairs) -> pair.PairBatch | shared_pair.SharedPairBatch:
        if self.shares_prompt:
            return shared_pair.collate_shared_pairs(pairs, self.tokenizer.pad_token_id, pack=self.pack_pairs)
        return pair.collate_pairs(pairs, self.tokenizer.pad_token_id)

    def describe(self) -> Description:
        return pair.describe(self.train_set, self.tokenizer)

    # -- what DPO's reference log-probs are checked against (splits, reference_batches: the base) --
    def fingerprint(self) -> str:
        """A hash of both splits' pairs, token by token (see `pair.fingerprint`)."""
        return pair.fingerprint(self.splits())


class UnpairedDataModule(CausalDataModule):
    """Unpaired feedback (KTO): a prompt, one reply and its label; only the reply is labelled. Each
    example also holds its KL row (its prompt + the previous example's reply within chunks of
    `batch_size`, TRL 1.16's construction: `unpaired.with_kl_rows`). `batch_size` counts examples."""

    read = staticmethod(unpaired.read_unpaired)
    detect_format = staticmethod(unpaired.detect_format)
    example_from_json = staticmethod(unpaired.example_from_json)
    example_length = staticmethod(unpaired.length)

    def __init__(self, data, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256, **kwargs):
        super().__init__(data, tokenizer, **kwargs)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        if max_prompt_length >= max_length:
            raise ConfigError(f"datamodule.max_prompt_length={max_prompt_length} leaves no room for the replies within "
                              f"datamodule.max_length={max_length}; set max_prompt_length below max_length "
                              f"(e.g. datamodule.max_prompt_length={max_length // 2})")
        if self.batch_size < 2:  # TRL refuses this too: the KL row would be the example itself
            raise ConfigError("datamodule.batch_size must be >= 2 for KTO: the reference point is estimated from each "
                              "prompt paired with another example's reply in its batch")
        ensure_chat_template(tokenizer)

    def settings(self) -> dict:
        return {**super().settings(), "max_length": self.max_length, "max_prompt_length": self.max_prompt_length}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_set = unpaired.with_kl_rows(self.train_set, self.batch_size, self.max_length)
        self.val_set = unpaired.with_kl_rows(self.val_set, self.batch_size, self.max_length)

    def render(self, record: Record, item: unpaired.Unpaired) -> Rendered:
        return unpaired.render(self.tokenizer, item, system_prompt=self.data.get("system_prompt"),
                               max_length=self.max_length, max_prompt_length=self.max_prompt_length)

    def nothing_left(self) -> str:
        return f"no example has reply tokens left within datamodule.max_length={self.max_length}"

    def collate_one(self, examples) -> unpaired.UnpairedBatch:
        return unpaired.collate_unpaired(examples, self.tokenizer.pad_token_id)

    def describe(self) -> Description:
        return unpaired.describe(self.train_set, self.tokenizer)

    # -- what KTO's reference log-probs are checked against (splits, reference_batches: the base) --
    def fingerprint(self) -> str:
        return unpaired.fingerprint(self.splits())


class PromptDataModule(CausalDataModule):
    """Prompts for RL stages (`{"question", "answer"}`, `{"prompt"}`, or conversations whose final
    assistant turn is the reference answer), rendered up to the assistant's turn. `batch_size`
    counts prompts per rollout; prompts longer than `max_prompt_length` tokens are dropped and counted."""

    read = staticmethod(prompt.read_prompt)
    detect_format = staticmethod(prompt.detect_format)
    example_from_json = staticmethod(prompt.example_from_json)

    def __init__(self, data, tokenizer, *, max_prompt_length: int = 256, **kwargs):
        super().__init__(data, tokenizer, **kwargs)
        if self.length_groups != 1:  # a step's prompts are one rollout batch; generation pads them anyway
            raise ConfigError("datamodule.length_groups applies to SFT, PT, RM and DPO batches; RL prompts take 1")
        if self.grad_accum != 1:
            raise ConfigError("RL stages take one batch of prompts per rollout: leave datamodule.grad_accum at 1 and "
                              "set module.mini_batch_size / module.micro_batch_size for the updates")
        self.max_prompt_length = max_prompt_length
        ensure_chat_template(tokenizer)

    def settings(self) -> dict:
        return {**super().settings(), "max_prompt_length": self.max_prompt_length}

    def render(self, record: Record, item: prompt.Prompt) -> Rendered:
        return prompt.render(self.tokenizer, item, system_prompt=self.data.get("system_prompt"),
                             max_prompt_length=self.max_prompt_length)

    def nothing_left(self) -> str:
        return f"no prompt fits datamodule.max_prompt_length={self.max_prompt_length}"

    def collate_one(self, examples) -> prompt.PromptBatch:
        return prompt.collate_prompts(examples, self.tokenizer.pad_token_id)

    def describe(self) -> Description:
        return prompt.describe(self.train_set, self.tokenizer)
