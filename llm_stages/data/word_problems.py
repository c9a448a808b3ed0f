"""Generated arithmetic word problems: one- and two-step stories in plain English with integer answers,
as RL prompts `{"question", "answer"}` (the records stage=grpo reads; `answer_match` checks the answer).

    "Mia has 7 apples. She buys 4 more and gives 5 to Leo. How many apples does Mia have now?"  -> "6"

Several story templates, names and objects; difficulty set by `max_number` (the largest number a story
adds or takes away), `max_factor` (the largest count of boxes and of things per box) and `two_step`
(the share of two-step stories). The splits never share a problem: a problem is its template and its
numbers, so no test story is a training story with other names. Deterministic in `seed`; written on
first use by `data.generate` (conf/data/word_problems.yaml), or by hand:

    python -m llm_stages.data.word_problems data/word_problems/arith_train.jsonl [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from llm_stages.data.generated import is_current, write_jsonl, write_spec
from llm_stages.errors import ConfigError
from llm_stages.ranges import FRACTION, Range, check_ranges

# (name, subject pronoun, object pronoun)
PEOPLE = [("Mia", "She", "her"), ("Leo", "He", "him"), ("Ava", "She", "her"), ("Noah", "He", "him"),
          ("Zoe", "She", "her"), ("Sam", "He", "him"), ("Lily", "She", "her"), ("Omar", "He", "him"),
          ("Emma", "She", "her"), ("Ravi", "He", "him"), ("Nina", "She", "her"), ("Ben", "He", "him")]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards", "stamps", "coins"]
SPLITS = ("train", "val", "test")
# The settings' bounds (conf/data/word_problems.yaml: data.<name>): a story needs room for its steps.
RANGES = {"two_step": FRACTION, "max_number": Range(3), "max_factor": Range(2)}


def _story(kind: str, a: int, b: int, c: int, who: tuple, other: tuple, third: tuple, obj: str) -> tuple[str, int]:
    """The question and answer of one story; `kind` names its template."""
    (name, she, her), (other_name, _, _), (third_name, _, _) = who, other, third
    stories = {
        # one step
        "buy": (f"{name} has {a} {obj}. {she} buys {b} more. How many {obj} does {name} have now?", a + b),
        "give": (f"{name} has {a} {obj}. {she} gives {b} to {other_name}. How many {obj} does {name} have left?",
                 a - b),
        "together": (f"{name} has {a} {obj} and {other_name} has {b} {obj}. How many {obj} do they have together?",
                     a + b),
        "fewer": (f"{name} has {a} {obj}. {other_name} has {b} fewer {obj} than {name}. "
                  f"How many {obj} does {other_name} have?", a - b),
        "more_than": (f"{name} has {a} {obj}. {other_name} has {b} more {obj} than {name}. "
                      f"How many {obj} does {other_name} have?", a + b),
        "finds": (f"{name} has {a} {obj}. {she} finds {b} more. How many {obj} does {name} have now?", a + b),
        "loses": (f"{name} has {a} {obj}. {she} loses {b} of them. How many {obj} does {name} have left?", a - b),
        "boxes": (f"{name} has {a} boxes with {b} {obj} in each box. How many {obj} does {name} have in all?", a * b),
        # two steps
        "buy_give": (f"{name} has {a} {obj}. {she} buys {b} more and gives {c} to {other_name}. "
                     f"How many {obj} does {name} have now?", a + b - c),
        "give_twice": (f"{name} has {a} {obj}. {she} gives {b} to {other_name} and {c} to {third_name}. "
                       f"How many {obj} does {name} have left?", a - b - c),
        "gifts": (f"{name} has {a} {obj}. {other_name} gives {her} {b} more, and then {third_name} gives {her} "
                  f"{c} more. How many {obj} does {name} have now?", a + b + c),
        "boxes_more": (f"{name} buys {a} boxes with {b} {obj} in each box. {she} already had {c} {obj}. "
                       f"How many {obj} does {name} have now?", a * b + c),
    }
    return stories[kind]


ONE_STEP = ("buy", "give", "together", "fewer", "more_than", "finds", "loses", "boxes")
TWO_STEP = ("buy_give", "give_twice", "gifts", "boxes_more")


def _numbers(kind: str, rng: random.Random, max_number: int, max_factor: int) -> tuple[int, int, int]:
    """Numbers for `kind` whose every step stays a whole, non-negative count."""
    n = lambda low=1, high=max_number: rng.randint(low, max(low, high))  # noqa: E731
    if kind in ("boxes", "boxes_more"):
        return n(2, max_factor), n(2, max_factor), n()
    if kind in ("give", "fewer", "loses"):
        a = n(2)
        return a, n(1, a - 1), 0
    if kind == "buy_give":
        a, b = n(), n()
        return a, b, n(1, a + b - 1)
    if kind == "give_twice":
        a = n(3)
        b = n(1, a - 2)
        return a, b, n(1, a - b - 1)
    return n(), n(), n()


def make_problem(rng: random.Random, steps: int = 1, max_number: int = 10, max_factor: int = 5) -> dict:
    """One random problem of `steps` (1 or 2) steps: {"question", "answer", "kind", "numbers"}."""
    kind = rng.choice(TWO_STEP if steps == 2 else ONE_STEP)
    numbers = _numbers(kind, rng, max_number, max_factor)
    who, other, third = rng.sample(PEOPLE, 3)
    question, answer = _story(kind, *numbers, who, other, third, rng.choice(OBJECTS))
    used = numbers if kind in TWO_STEP else numbers[:2]
    return {"question": question, "answer": answer, "kind": kind, "numbers": list(used)}


def word_problems(sizes: dict[str, int], seed: int = 0, max_number: int = 10, max_factor: int = 5,
                  two_step: float = 0.3, shots: list | None = None) -> dict[str, list[dict]]:
    """Records `{"question", "answer"}` for each split in `sizes` (e.g. {"train": 400, "val": 100,
    "test": 200}), a `two_step` share of each split two-step stories (in random order), no problem
    (template and numbers) in two splits. With `shots` ([[question, reply], ...]: worked examples)
    each record is `{"prompt": messages, "answer"}` instead: the examples as earlier exchanges of the
    conversation, then the question. Held-out splits are drawn first, so
    their problems do not change with the training size."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    records: dict[str, list[dict]] = {}
    for split in sorted(sizes, key=lambda s: SPLITS.index(s) if s in SPLITS else -1, reverse=True):
        two = round(two_step * sizes[split])
        steps = [2] * two + [1] * (sizes[split] - two)
        rng.shuffle(steps)
        records[split] = [_record(_unseen(rng, n, max_number, max_factor, seen, split), shots) for n in steps]
    return {split: records[split] for split in sizes}


def _unseen(rng: random.Random, steps: int, max_number: int, max_factor: int, seen: set, split: str) -> dict:
    """A problem of `steps` steps not in `seen` (then added to it)."""
    for _ in range(10_000):
        problem = make_problem(rng, steps, max_number, max_factor)
        key = (problem["kind"], *problem["numbers"])
        if key not in seen:
            seen.add(key)
            return problem
    raise ConfigError(f"word problems: too few distinct {steps}-step problems left for the {split} split with "
                      f"max_number={max_number}, max_factor={max_factor}; ask for fewer (data.size, data.val_size, "
                      "data.test_size) or raise the ranges")


def _record(problem: dict, shots: list | None) -> dict:
    if not shots:
        return {"question": problem["question"], "answer": str(problem["answer"])}
    examples = [turn for question, reply in shots
                for turn in ({"role": "user", "content": question}, {"role": "assistant", "content": reply})]
    return {"prompt": [*examples, {"role": "user", "content": problem["question"]}], "answer": str(problem["answer"])}


def ensure_word_problems(out: str | Path, size: int = 400, val_size: int = 100, test_size: int = 200,
                         seed: int = 0, max_number: int = 10, max_factor: int = 5, two_step: float = 0.3,
                         shots: list | None = None) -> dict[str, Path]:
    """`<name>_train.jsonl` at `out`, `<name>_val.jsonl` (found by data.val_path=auto) and `<name>_test.jsonl`
    beside it, rewritten only when missing or written with other settings (kept in `<name>_spec.json`):
    what `data.generate` calls before the data is read."""
    out = Path(out)
    if not out.name.endswith("_train.jsonl"):
        raise ConfigError(f"data.path={out}: name the word-problem training file <name>_train.jsonl (the "
                          "validation and test files are written beside it)")
    check_ranges({"two_step": two_step, "max_number": max_number, "max_factor": max_factor}, RANGES, "data")
    if any(not isinstance(shot, (list, tuple)) or len(shot) != 2 or not all(isinstance(t, str) for t in shot)
           for shot in shots or []):
        raise ConfigError(f"data.shots={shots}: each worked example is a pair [question, reply] of strings")
    paths = {split: out.with_name(out.name.replace("_train.jsonl", f"_{split}.jsonl")) for split in SPLITS}
    spec = {"size": size, "val_size": val_size, "test_size": test_size, "seed": seed, "max_number": max_number,
            "max_factor": max_factor, "two_step": two_step, "shots": [list(s) for s in shots or []]}
    spec_file = out.with_name(out.name.replace("_train.jsonl", "_spec.json"))
    if is_current(spec_file, spec, paths.values()):
        return paths
    records = word_problems({"train": size, "val": val_size, "test": test_size}, seed, max_number, max_factor,
                            two_step, shots)
    for split, path in paths.items():
        write_jsonl(path, records[split])
    write_spec(spec_file, spec)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the training file, <name>_train.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--val-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        paths = ensure_word_problems(args.out, args.size, args.val_size, args.test_size, args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
