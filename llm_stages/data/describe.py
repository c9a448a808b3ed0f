"""What `inspect` shows of a kind's examples: token-length statistics and a sample with its trained
tokens marked. Each record kind's `describe` builds its `Description` from these pieces."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

from llm_stages.data.render import IGNORE_INDEX, num_trained_tokens

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


class Description(NamedTuple):
    lengths: dict[str, dict]  # e.g. "sequence", "trained" (pairs: "chosen ...", "rejected ...") -> length_stats
    sample: dict[str, str]  # "example" (SFT), "chosen"/"rejected" (pairs), "block" (PT), "prompt" (RL) -> text
    note: str  # one line about the sample (its token counts)


def length_stats(values: list[int]) -> dict:
    """min / mean / p50 / p95 / max (nearest-rank percentiles) of a list of counts."""
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"min": ordered[0], "mean": sum(ordered) / len(ordered), "p50": pct(50), "p95": pct(95), "max": ordered[-1]}


def decode(tokenizer, ids) -> str:
    """Token ids as the text they are, special tokens and spacing included."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def mark_trained(tokenizer, input_ids, labels) -> str:
    """The decoded sequence with each run of trained (labelled) tokens wrapped in `[[` and `]]`."""
    parts = []
    for trained, run in itertools.groupby(zip(input_ids, labels), key=lambda t: t[1] != IGNORE_INDEX):
        text = decode(tokenizer, [t for t, _ in run])
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(parts)


def trained(labels) -> int:
    """Tokens a sequence trains (see render.num_trained_tokens)."""
    return num_trained_tokens(list(labels))


def causal_lengths(examples) -> dict[str, dict]:
    """Sequence and trained-token statistics of causal examples (ids + labels)."""
    return {"sequence": length_stats([len(e.input_ids) for e in examples]),
            "trained": length_stats([trained(e.labels) for e in examples])}
