"""Preference pairs (RM, DPO): a shared prompt and a chosen and a rejected reply. Read from sharegpt,
TRL prompt/chosen/rejected (UltraFeedback's whole conversations too), ColossalAI, MedicalGPT,
two conversations sharing all but the last turn, or hh-rlhf transcripts; rendered as the two
sequences a reward model scores, only the replies trained; collated chosen rows first, then
rejected rows, so one forward pass scores both."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch

from llm_stages.data.collate import collate_causal
from llm_stages.data.columns import cannot_tell, field, prepare, read_as, record_tools, unpaired_elsewhere, with_system
from llm_stages.data.describe import Description, length_stats, mark_trained, trained
from llm_stages.data.kinds.conversation import alpaca_messages, prompt_messages, replies, reply, sharegpt_messages
from llm_stages.data.messages import text_value, to_messages
from llm_stages.data.render import (IGNORE_INDEX, Example, Rendered, num_trained_tokens, prompt_length,
                                    render_conversation, with_system_prompt)
from llm_stages.data.reward_sequence import reply_end, reward_sequence
from llm_stages.data.sources import Record
from llm_stages.errors import DataFormatError


class Pair(NamedTuple):
    prompt: list[dict]  # messages before the compared reply
    chosen: dict  # the preferred assistant message (content, and reasoning / tool calls when given)
    rejected: dict
    tools: list[dict] | None = None


# --- read ----------------------------------------------------------------------------------------

def sharegpt_pair(record: Record) -> Pair:
    """MedicalGPT / LLaMA-Factory: `{"conversations": [...prompt...], "chosen": ..., "rejected": ...}`."""
    return Pair(sharegpt_messages(record), reply(record, "chosen"), reply(record, "rejected"))


def prompt_pair(record: Record) -> Pair:
    """TRL: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`. Replies
    that are whole conversations (UltraFeedback's binarized layout repeats the prompt in them) are
    read as two conversations sharing every turn but the last."""
    chosen, rejected = replies(record, "chosen"), replies(record, "rejected")
    if (len(chosen) > 1 or len(rejected) > 1) and any(m["role"] == "user" for m in chosen):
        return implicit_prompt_pair(record)
    return Pair(prompt_messages(record), reply(record, "chosen"), reply(record, "rejected"))


def colossal_pair(record: Record) -> Pair:
    """ColossalAI: `{"context": [messages], "chosen": [messages], "rejected": [messages]}`."""
    return Pair(with_system(record, to_messages(record, "context", field(record, "context"))),
                reply(record, "chosen"), reply(record, "rejected"))


def implicit_prompt_pair(record: Record) -> Pair:
    """Two whole conversations under `chosen` / `rejected` (TRL's implicit prompt; any names through
    `data.columns`) sharing every turn but the final assistant reply."""
    chosen = to_messages(record, "chosen", field(record, "chosen"))
    rejected = to_messages(record, "rejected", field(record, "rejected"))
    last_roles = {chosen[-1]["role"], rejected[-1]["role"]} if chosen and rejected else set()
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or last_roles != {"assistant"}:
        raise DataFormatError(record.path, "chosen and rejected conversations must share every turn but a final "
                              "assistant reply", line=record.line, field="chosen")
    return Pair(with_system(record, chosen[:-1]), chosen[-1], rejected[-1])


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_turns(record: Record, name: str, text: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataFormatError(record.path, "expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
                              line=record.line, field=name)
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def hh_rlhf_pair(record: Record) -> Pair:
    """Anthropic hh-rlhf: `{"chosen": transcript, "rejected": transcript}`. The prompt is the
    transcript up to the last `Assistant:` the two share; each reply is the rest of its transcript
    (normally the final Assistant turn, possibly empty; a few records diverge a turn earlier, and
    then the reply runs on through the later turns, as the rated continuation)."""
    chosen = text_value(record, "chosen", field(record, "chosen"))
    rejected = text_value(record, "rejected", field(record, "rejected"))
    start = os.path.commonprefix([chosen, rejected]).rfind(_HH_ASSISTANT)
    if start < 0:
        raise DataFormatError(record.path, "the two transcripts share no turn up to an 'Assistant:'",
                              line=record.line, field="rejected")
    end = start + len(_HH_ASSISTANT)
    if chosen[end:end + 1] == " " and rejected[end:end + 1] == " ":
        end += 1
    prompt = _hh_turns(record, "chosen", chosen[:start])
    if prompt[-1]["role"] != "user":
        raise DataFormatError(record.path, "the shared transcript must end with a Human turn", line=record.line,
                              field="chosen")
    return Pair(prompt, {"role": "assistant", "content": chosen[end:]}, {"role": "assistant", "content": rejected[end:]})


def medicalgpt_original_pair(record: Record) -> Pair:
    """MedicalGPT original: `{"system"?, "history"?: [[q, a]], "question", "response_chosen", "response_rejected"}`."""
    as_alpaca = Record(record.path, record.line, {"instruction": field(record, "question"), "output": "",
                                                  "system": record.data.get("system"), "history": record.data.get("history")})
    messages = alpaca_messages(as_alpaca)[:-1]  # drop the empty placeholder reply
    return Pair(messages, reply(record, "response_chosen"), reply(record, "response_rejected"))


PAIR_READERS: dict[str, Callable[[Record], Pair]] = {
    "sharegpt_pair": sharegpt_pair,
    "prompt_pair": prompt_pair,
    "medicalgpt_original": medicalgpt_original_pair,
    "colossal_pair": colossal_pair,
    "implicit_prompt": implicit_prompt_pair,
    "hh_rlhf": hh_rlhf_pair,
}


def detect_format(record: Record) -> str:
    keys = record.data.keys()
    if "response_chosen" in keys:
        return "medicalgpt_original"
    if "label" in keys and ("completion" in keys or "messages" in keys):
        raise unpaired_elsewhere(record)
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_pair"
        if "prompt" in keys:
            return "prompt_pair"
        if "context" in keys:
            return "colossal_pair"
        if isinstance(record.data["chosen"], list):
            return "implicit_prompt"
        if isinstance(record.data["chosen"], str) and "\n\nHuman:" in record.data["chosen"]:
            return "hh_rlhf"
    raise cannot_tell(record, "preference", "'conversations'|'prompt'|'context' + 'chosen' + 'rejected', two "
                      "conversations under 'chosen' + 'rejected', 'question' + 'response_chosen' + "
                      "'response_rejected', or hh-rlhf transcripts")


def read_pair(record: Record, fmt: str = "auto", columns: Mapping | None = None) -> Pair:
    """A preference pair. Empty replies are valid (the end-of-turn token is what is scored); whether
    the two replies are identical is `render`'s to tell (the DataModule counts and skips them). A
    `margin` that is not a finite number is a bad record here, at load, not a NaN loss later."""
    record = prepare(record, columns)
    margin_of(record)
    pair = read_as(record, fmt, PAIR_READERS, detect_format, "preference")
    return pair._replace(tools=record_tools(record))


def iter_pairs(records: list[Record], fmt: str = "auto") -> Iterator[tuple[Record, Pair]]:
    return ((record, read_pair(record, fmt)) for record in records)


def margin_of(record: Record) -> float:
    """The record's `margin` (how much better chosen is; 0 when absent)."""
    margin = record.data.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise DataFormatError(record.path, f"expected a number, got {type(margin).__name__}", line=record.line,
                              field="margin")
    if not math.isfinite(margin):
        # JSON readers take NaN / Infinity; in the loss it would make every step's loss NaN.
        raise DataFormatError(record.path, f"expected a finite number, got {margin}; fix or drop the value, or "
                              "skip such records with data.on_bad_record=skip", line=record.line, field="margin")
    return float(margin)


# --- render --------------------------------------------------------------------------------------

class PairExample(NamedTuple):
    chosen: Example  # prompt + chosen reply; only the reply is labelled
    rejected: Example
    index: int = -1  # position in its split, so cached reference log-probs can be looked up
    margin: float = 0.0  # how much better chosen is, when the data says (reward-model margin)


def example_from_json(item) -> PairExample:
    chosen, rejected, index, margin = item
    return PairExample(Example(*chosen), Example(*rejected), index, margin)


def render_reply(tokenizer, prompt: list[dict], answer: dict | str, tools: list[dict] | None = None,
                 end=None) -> Example:
    """Prompt + one reply (an assistant message, or its text), only the reply trained: the sequence
    a reward model scores (llm_stages.data.reward_sequence), as RL scores its replies. (KTO renders
    its unpaired replies the same way.)"""
    end = end or reply_end(tokenizer)
    message = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
    example = render_conversation(tokenizer, prompt + [message], tools=tools, train_last_only=True)
    start = prompt_length(example.labels)
    ids = reward_sequence(example.input_ids[:start], example.input_ids[start:], end)
    return Example(ids, (example.labels + [IGNORE_INDEX] * len(ids))[:len(ids)])


def render_pair(tokenizer, prompt: list[dict], chosen: dict | str, rejected: dict | str,
                tools: list[dict] | None = None) -> PairExample:
    """Prompt + each reply, only the reply trained (see `render_reply`)."""
    end = reply_end(tokenizer)
    return PairExample(render_reply(tokenizer, prompt, chosen, tools, end),
                       render_reply(tokenizer, prompt, rejected, tools, end))


def truncate_pair(pair: PairExample, max_length: int, max_prompt_length: int) -> tuple[PairExample, bool]:
    """Fit both sequences in `max_length`: the shared prompt is cut from the left to
    `max_prompt_length` (keeping its last turns), then replies from the right."""
    n_prompt = prompt_length(pair.chosen.labels)
    longest = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
    if longest <= max_length:
        return pair, False
    keep_prompt = min(n_prompt, max_prompt_length)

    def cut(e: Example) -> Example:
        p = prompt_length(e.labels)
        ids, labels = e.input_ids[p - keep_prompt:], e.labels[p - keep_prompt:]
        return Example(ids[:max_length], labels[:max_length])

    return pair._replace(chosen=cut(pair.chosen), rejected=cut(pair.rejected)), True


TOO_LONG_SETTINGS = ("truncate", "drop")


def render(tokenizer, record: Record, pair: Pair, *, system_prompt: str | None, max_length: int,
           max_prompt_length: int, too_long: str = "truncate") -> Rendered:
    """The pair's two sequences within `max_length`; dropped when the replies are identical (no
    preference to learn), when either has no reply token left, or, with `too_long="drop"`, when
    either is longer than `max_length` (TRL's RewardTrainer filters such pairs out; truncating
    instead moves a reward model's score off the end of the reply)."""
    if pair.chosen == pair.rejected:
        return Rendered(None, dropped="identical_pair")
    prompt = with_system_prompt(pair.prompt, system_prompt)
    example = render_pair(tokenizer, prompt, pair.chosen, pair.rejected, tools=pair.tools)._replace(
        margin=margin_of(record))
    if too_long == "drop" and length(example) > max_length:
        return Rendered(None, dropped="too_long")
    example, truncated = truncate_pair(example, max_length, max_prompt_length)
    if min(num_trained_tokens(example.chosen.labels), num_trained_tokens(example.rejected.labels)) == 0:
        return Rendered(None, truncated, dropped="no_trained_tokens")
    return Rendered(example, truncated)


def pair_rows(pair: PairExample) -> tuple:
    return pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids, pair.rejected.labels


def fingerprint(splits: dict[str, list], rows_of: Callable[..., tuple] = pair_rows) -> str:
    """A hash of every example's token rows (`rows_of`: a pair's ids and labels) in each split, in order:
    what per-example values computed from them (DPO's and KTO's cached reference log-probs) are a function
    of (data, template, tokenizer, truncation)."""
    digest = hashlib.sha256()
    for split, examples in splits.items():
        digest.update(f"{split}:{len(examples)}".encode())
        for example in examples:
            for row in rows_of(example):
                digest.update(len(row).to_bytes(8, "little") + np.asarray(row, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# --- collate -------------------------------------------------------------------------------------

class PairBatch(NamedTuple):
    """Chosen rows first, then rejected rows, so one forward pass scores both."""

    input_ids: torch.Tensor  # (2 * pairs, seq)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # reply tokens only
    index: torch.Tensor  # (pairs,) position of each pair in its split
    margin: torch.Tensor  # (pairs,) per-pair margin from the data (0 when absent)

    @property
    def num_pairs(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_pairs(pairs: list[PairExample], pad_id: int) -> PairBatch:
    rows = collate_causal([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PairBatch(rows.input_ids, rows.attention_mask, rows.labels, index=torch.tensor([p.index for p in pairs], dtype=torch.long),
                     margin=torch.tensor([p.margin for p in pairs], dtype=torch.float32))


def length(pair: PairExample) -> int:
    """The longer of the two sequences (what length grouping sorts by)."""
    return max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


# --- describe ------------------------------------------------------------------------------------

def describe(pairs: list[PairExample], tokenizer) -> Description:
    lengths, sample = {}, {}
    for side in ("chosen", "rejected"):
        examples = [getattr(p, side) for p in pairs]
        lengths[f"{side} sequence"] = length_stats([len(e.input_ids) for e in examples])
        lengths[f"{side} trained"] = length_stats([trained(e.labels) for e in examples])
        sample[side] = mark_trained(tokenizer, *getattr(pairs[0], side))
    first = pairs[0]
    return Description(lengths, sample, f"prompt {prompt_length(first.chosen.labels)} tokens, chosen "
                       f"{trained(first.chosen.labels)} trained, rejected {trained(first.rejected.labels)} trained")
