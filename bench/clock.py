"""Per-step records both sides of a comparison write, and the one function that turns them into rates.

Kept free of Lightning, TRL and llm_stages imports: every benchmark child imports it, and an import
only one side needs would show up in that side's peak RSS.
"""

from __future__ import annotations

import json
import statistics
import time


class StepClock:
    """Wall-clock times of each optimiser step (or RL iteration) and what it processed.

    A side calls `begin()` when a step starts, `add(tokens=..., samples=...)` (any number of times,
    any counter names) while it runs, and `end()` when it is over.
    """

    def __init__(self):
        self.steps: list[dict] = []
        self._current: dict | None = None

    def begin(self) -> None:
        self._current = {"start": time.perf_counter()}

    def add(self, **counts: float) -> None:
        if self._current is None:  # counted outside a step (e.g. a precompute pass): not part of any rate
            return
        for name, value in counts.items():
            self._current[name] = self._current.get(name, 0.0) + float(value)

    def end(self) -> None:
        if self._current is None:
            return
        self._current["end"] = time.perf_counter()
        self.steps.append(self._current)
        self._current = None

    def dump(self, path: str, **extra) -> None:
        with open(path, "w") as f:
            json.dump({"steps": self.steps, **extra}, f)


def summarise(steps: list[dict], warmup: int) -> dict[str, float]:
    """Rates over the steps after the first `warmup` ones.

    The timed window runs from the end of the last warm-up step to the end of the last step, so it
    holds everything the training loop does between steps too (fetching and collating the next batch,
    logging hooks), which a sum of per-step durations would leave out. With no warm-up it starts at
    the first step's start.

    - steps_per_s, samples_per_s, tokens_per_s: over that window.
    - rollout_tokens_per_s: generated tokens / seconds spent generating (RL only).
    - update_tokens_per_s: tokens through the policy update / seconds spent updating (RL only).
    """
    if len(steps) <= warmup:
        raise ValueError(f"{len(steps)} steps recorded, not more than the {warmup} warm-up steps")
    timed = steps[warmup:]
    origin = steps[warmup - 1]["end"] if warmup > 0 else steps[0]["start"]
    seconds = timed[-1]["end"] - origin
    total = lambda key: sum(s.get(key, 0.0) for s in timed)  # noqa: E731
    out = {"timed_steps": len(timed), "timed_seconds": seconds, "steps_per_s": len(timed) / seconds,
           "samples_per_s": total("samples") / seconds, "tokens_per_s": total("tokens") / seconds,
           "tokens_per_step": total("tokens") / len(timed), "samples_per_step": total("samples") / len(timed),
           "median_step_s": statistics.median(s["end"] - s["start"] for s in timed)}
    if total("generation_seconds") > 0:
        out["rollout_tokens_per_s"] = total("generated_tokens") / total("generation_seconds")
    if total("update_seconds") > 0:
        out["update_tokens_per_s"] = total("update_tokens") / total("update_seconds")
    return out
