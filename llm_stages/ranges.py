"""Allowed ranges of typed settings, declared next to the parameters they bound (each loss's
hyperparameters, the RL stages' coefficients, the sampling settings here) and checked with the
config, before any model loads: a value outside its range is one ConfigError naming the key, the
value and the range. Nonsense such as a negative beta or temperature would otherwise train, or fail
minutes later, without saying why."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llm_stages.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (None: unbounded), each bound included unless `*_open`;
    `integer`: whole numbers only; `nullable`: null is allowed too (the setting is off or defaulted);
    `note`: what to do instead, e.g. how to turn the setting off ({prefix}: the setting's config node)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    note: str = ""

    def contains(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, prefix: str = "") -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            text = (f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = kind
        text += ", or null" if self.nullable else ""
        return text + (f" ({self.note.format(prefix=prefix)})" if self.note else "")

    def check(self, key: str, value) -> None:
        if not self.contains(value):
            raise ConfigError(f"{key}={value}: expected {self.describe(key.rpartition('.')[0])}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # e.g. GAE's lambda


def check_ranges(settings: Mapping, ranges: Mapping[str, Range], prefix: str) -> None:
    """Each of `settings` that `ranges` bounds, checked as `<prefix>.<name>`; others are left alone."""
    for name, allowed in ranges.items():
        if name in settings:
            allowed.check(f"{prefix}.{name}", settings[name])


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# What RL's log-probs model of sampling (softmax of logits / temperature; top_k and top_p truncate it),
# and their ranges; `batch_size` only splits the generate calls. A setting the loss does not model
# (repetition_penalty, ...) would make the ratio compare different distributions, so it is refused.
SAMPLING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample")
SAMPLING_RANGES = {
    "max_new_tokens": Range(1, integer=True),
    # 0 would divide the logits by zero; null samples at 1.
    "temperature": Range(0, low_open=True, nullable=True, note="greedy: {prefix}.do_sample=false"),
    # 0 keeps no token at all; null: 1 (no cut).
    "top_p": Range(0, 1, low_open=True, nullable=True),
    "top_k": Range(0, integer=True, nullable=True, note="0: no top-k cut"),
    "batch_size": Range(1, integer=True, nullable=True, note="null: all of the rollout at once"),
}


def check_sampling_settings(*settings: Mapping, key: str = "rollout.generation") -> None:
    """Sampling settings (`rollout.generation`, `rollout.val_generation`, chat's `generation`): only
    the ones RL's log-probs model, each within its range."""
    for name in {k: None for s in settings for k in s}:
        if name not in (*SAMPLING_SETTINGS, "batch_size"):
            raise ConfigError(f"{key}.{name}: sampling takes only {', '.join(SAMPLING_SETTINGS)} and batch_size, "
                              "the settings RL's log-probs model")
    for s in settings:
        if "do_sample" in s and not isinstance(s["do_sample"], bool):
            raise ConfigError(f"{key}.do_sample={s['do_sample']}: expected true or false")
        check_ranges(s, SAMPLING_RANGES, key)
