"""Unpaired feedback (KTO): a prompt, one reply and a label saying whether the reply is desirable.
Read from TRL's `{prompt, completion, label}` or `{messages, label}`; rendered as the sequence a
reward model scores (as pairs are), only the reply trained; each example also carries its KL row —
its prompt with another example's reply, the mismatched pair KTO estimates its reference point
from (`with_kl_rows`, TRL 1.16's construction) — and is collated completion rows first, then KL
rows, so one forward pass scores both."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from llm_stages.data.collate import collate_causal
from llm_stages.data.columns import cannot_tell, field, prepare, read_as, record_tools
from llm_stages.data.describe import Description, length_stats, mark_trained, trained
from llm_stages.data.kinds.conversation import messages_messages, prompt_messages, reply
from llm_stages.data.kinds import pair
from llm_stages.data.kinds.pair import render_reply
from llm_stages.data.render import IGNORE_INDEX, Example, Rendered, num_trained_tokens, prompt_length, with_system_prompt
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError


class Unpaired(NamedTuple):
    prompt: list[dict]
    completion: dict  # the assistant reply the label judges
    label: bool  # True: desirable
    tools: list[dict] | None = None


def prompt_completion_label(record: Record) -> Unpaired:
    """TRL KTO: `{"prompt": str | messages, "completion": str | messages, "label": bool}`."""
    return Unpaired(prompt_messages(record), reply(record, "completion"), _label_value(record))


def messages_label(record: Record) -> Unpaired:
    """`{"messages": [... , final assistant reply], "label": bool}`."""
    messages = messages_messages(record)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise DataFormatError(record.path, "expected the conversation to end with the judged assistant reply",
                              line=record.line, field="messages")
    return Unpaired(messages[:-1], messages[-1], _label_value(record))


UNPAIRED_READERS: dict[str, Callable[[Record], Unpaired]] = {
    "prompt_completion_label": prompt_completion_label,
    "messages_label": messages_label,
}


def detect_format(record: Record) -> str:
    keys = record.data.keys()
    if "label" in keys and "completion" in keys:
        return "prompt_completion_label"
    if "label" in keys and "messages" in keys:
        return "messages_label"
    raise cannot_tell(record, "unpaired feedback", "'prompt' + 'completion' + 'label' or 'messages' + 'label'")


def read_unpaired(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Unpaired:
    record = prepare(record, columns)
    return read_as(record, fmt, UNPAIRED_READERS, detect_format, "unpaired feedback")._replace(tools=record_tools(record))


def _label_value(record: Record) -> bool:
    value = field(record, "label")
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataFormatError(record.path, f"expected true/false (or 1/0), got {value!r:.40}", line=record.line, field="label")


# --- render --------------------------------------------------------------------------------------

class UnpairedExample(NamedTuple):
    completion: Example  # prompt + the judged reply; only the reply labelled
    label: bool  # True: desirable
    kl: Example | None = None  # this prompt + another example's reply (see `with_kl_rows`)
    index: int = -1  # position in its split, so cached reference log-probs can be looked up


def example_from_json(item) -> UnpairedExample:
    completion, label, kl, index = item
    return UnpairedExample(Example(*completion), bool(label), Example(*kl) if kl else None, index)


def render(tokenizer, item: Unpaired, *, system_prompt: str | None, max_length: int,
           max_prompt_length: int) -> Rendered:
    """Prompt + reply within `max_length`: the prompt cut from the left to `max_prompt_length`
    (keeping its last turns), then the sequence from the right; dropped when no reply token is left."""
    prompt = with_system_prompt(item.prompt, system_prompt)
    example = render_reply(tokenizer, prompt, item.completion, item.tools)
    truncated = len(example.input_ids) > max_length
    if truncated:
        cut = max(prompt_length(example.labels) - max_prompt_length, 0)
        example = Example(example.input_ids[cut:][:max_length], example.labels[cut:][:max_length])
    if num_trained_tokens(example.labels) == 0:
        return Rendered(None, truncated, dropped="no_trained_tokens")
    return Rendered(UnpairedExample(example, item.label), truncated)


def kl_partners(n: int, batch_size: int) -> list[int]:
    """Whose reply example i's KL row takes, as TRL 1.16 builds its KL dataset: the examples in
    consecutive chunks of `batch_size` (its per-device batch), each chunk's replies rotated by one
    — (x1, yk), (x2, y1), ..., (xk, yk-1) — so a chunk's mismatched replies are its own replies."""
    partners = []
    for start in range(0, n, batch_size):
        chunk = list(range(start, min(start + batch_size, n)))
        partners += chunk[-1:] + chunk[:-1]
    return partners


def mismatched(prompt_of: Example, reply_of: Example, max_length: int) -> Example:
    """The prompt tokens of one example followed by the reply tokens of another (TRL concatenates
    token ids the same way), cut from the right to `max_length`."""
    p, r = prompt_length(prompt_of.labels), prompt_length(reply_of.labels)
    ids = list(prompt_of.input_ids[:p]) + list(reply_of.input_ids[r:])
    labels = [IGNORE_INDEX] * p + list(reply_of.labels[r:])
    return Example(ids[:max_length], labels[:max_length])


def with_kl_rows(examples: list[UnpairedExample], batch_size: int, max_length: int) -> list[UnpairedExample]:
    """The split's examples numbered in order, each with its KL row (`kl_partners`)."""
    partners = kl_partners(len(examples), batch_size)
    return [e._replace(index=i, kl=mismatched(e.completion, examples[j].completion, max_length))
            for i, (e, j) in enumerate(zip(examples, partners))]


def fingerprint(splits: dict[str, list[UnpairedExample]]) -> str:
    """A hash of every example's rows and label in each split, in order: what per-example values
    computed from them (cached reference log-probs) are a function of."""
    return pair.fingerprint(splits, rows_of=lambda e: (e.completion.input_ids, e.completion.labels, e.kl.input_ids,
                                                       e.kl.labels, [int(e.label)]))


# --- collate -------------------------------------------------------------------------------------

class UnpairedBatch(NamedTuple):
    """Completion rows first, then KL rows (each prompt with another example's reply)."""

    input_ids: torch.Tensor  # (2 * examples, seq)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # reply tokens only
    index: torch.Tensor  # (examples,) position of each example in its split
    label: torch.Tensor  # (examples,) bool, True: desirable

    @property
    def num_examples(self) -> int:
        return self.index.shape[0]

    def completion_rows(self) -> UnpairedBatch:
        n = self.num_examples
        return self._replace(input_ids=self.input_ids[:n], attention_mask=self.attention_mask[:n], labels=self.labels[:n])

    def kl_rows(self) -> UnpairedBatch:
        n = self.num_examples
        return self._replace(input_ids=self.input_ids[n:], attention_mask=self.attention_mask[n:], labels=self.labels[n:])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_unpaired(examples: list[UnpairedExample], pad_id: int) -> UnpairedBatch:
    rows = collate_causal([e.completion for e in examples] + [e.kl for e in examples], pad_id)
    return UnpairedBatch(rows.input_ids, rows.attention_mask, rows.labels,
                         index=torch.tensor([e.index for e in examples], dtype=torch.long),
                         label=torch.tensor([e.label for e in examples], dtype=torch.bool))


def length(example: UnpairedExample) -> int:
    """The longer of its two rows (what length grouping sorts by)."""
    return max(len(example.completion.input_ids), len(example.kl.input_ids) if example.kl else 0)


# --- describe ------------------------------------------------------------------------------------

def describe(examples: list[UnpairedExample], tokenizer) -> Description:
    lengths = {"sequence": length_stats([len(e.completion.input_ids) for e in examples]),
               "trained": length_stats([trained(e.completion.labels) for e in examples])}
    sample = {}
    for name, label in (("desirable", True), ("undesirable", False)):
        first = next((e for e in examples if e.label == label), None)
        if first is not None:
            sample[name] = mark_trained(tokenizer, *first.completion)
    n_desirable = sum(e.label for e in examples)
    return Description(lengths, sample, f"the first of each label; {n_desirable} desirable / {len(examples) - n_desirable} undesirable")
