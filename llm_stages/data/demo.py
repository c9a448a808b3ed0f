"""The demo task: a number 0-99 plus or minus a digit 0-9, with exact answers, in every stage's format
(PT text, SFT conversations, preference pairs, unpaired feedback for KTO, RL prompts).

Small and regular enough that a ~1M-parameter model learns it in minutes on CPU, and verifiable,
so RL stages can reward exact answers. Every problem outside the training split can be solved by
rules the training split shows (copy the numbers, the units digit from a 10 x 10 table, a carry or
borrow into the tens), so held-out accuracy measures learning, not recall. Two-digit operands on
both sides ask for carries a model of this size does not learn in minutes (~6% held-out exact
answers after 1,500 SFT steps, whether on 2,000 or 15,000 training problems). Generated
deterministically from a seed:

    python -m llm_stages.data.demo OUT_DIR [--seed 0] [--n-train 1600] [--n-val 200]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from llm_stages.data.generated import is_current, write_jsonl, write_spec
from llm_stages.training.run_dir import write_text_atomic

DEMO_FILES = {
    "pt_train": "pt_train.txt", "pt_val": "pt_val.txt",
    "sft_train": "sft_train.jsonl", "sft_val": "sft_val.jsonl",
    # The training conversations again, with a share of the carries and borrows forgotten (make demo's SFT).
    "sft_slips_train": "sft_slips_train.jsonl",
    "pref_train": "pref_train.jsonl", "pref_val": "pref_val.jsonl",
    "rl_train": "rl_train.jsonl", "rl_val": "rl_val.jsonl",
    "unpaired_train": "unpaired_train.jsonl", "unpaired_val": "unpaired_val.jsonl",
    # Held out from training and validation alike (the eval suite's data; conf/eval/demo.yaml).
    "sft_test": "sft_test.jsonl", "pref_test": "pref_test.jsonl", "rl_test": "rl_test.jsonl",
}
QUESTION_TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {word} {b}.", "{a} {op} {b} = ?"]
SYSTEM_PROMPTS = ["You are a careful calculator.", "Answer with the equation and its result."]
WORDS = {"+": "plus", "-": "minus"}
# The share of the demonstrations in sft_slips_train.jsonl that forget the carry or borrow, of
# those that have one. Above one half, an SFT model that imitates them forgets it in most greedy
# answers, yet samples the right tens digit often enough for an exact-answer reward to find it:
# the gap RL with a verifier closes and imitation cannot (docs/stages.md, the demo).
CARRY_SLIP_RATE = 0.6
# The generator's format: bump it when what write_demo_data writes changes, so that files an older
# version wrote are rewritten on the next run (ensure_demo_data) rather than trained on.
DEMO_DATA_VERSION = 2
# Every problem of the task: (a, op, b) with a in 0..99 and b in 0..9.
TRIPLES = [(a, op, b) for a in range(100) for op in "+-" for b in range(10)]


def _problem(a: int, op: str, b: int, rng: random.Random) -> dict:
    answer = a + b if op == "+" else a - b
    question = rng.choice(QUESTION_TEMPLATES).format(a=a, op=op, b=b, word=WORDS[op])
    return {"a": a, "b": b, "op": op, "answer": answer, "question": question, "solution": f"{a} {op} {b} = {answer}"}


def make_problem(rng: random.Random) -> dict:
    """A random problem: {"a", "b", "op", "answer", "question", "solution"}, with a in 0..99, b in 0..9."""
    return _problem(*rng.choice(TRIPLES), rng)


def _split_problems(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / val problems: no (a, op, b) appears in both."""
    rng = random.Random(seed)
    triples = list(TRIPLES)
    rng.shuffle(triples)
    if n_train + n_val > len(triples):
        raise ValueError(f"at most {len(triples)} distinct problems")
    val = [_problem(*t, rng) for t in triples[:n_val]]
    train = [_problem(*t, rng) for t in triples[n_val:n_val + n_train]]
    return train, val


def _test_problems(seed: int, n_train: int, n_val: int, n_test: int) -> list[dict]:
    """Problems in neither split of `_split_problems` (the same shuffled triples, taken after
    them), worded with their own generator so the train and val files stay what they were."""
    triples = list(TRIPLES)
    random.Random(seed).shuffle(triples)
    rng = random.Random(seed + 2)
    return [_problem(*t, rng) for t in triples[n_val + n_train:n_val + n_train + n_test]]


def _wrong(p: dict, rng: random.Random) -> str:
    """A wrong reply of the same shape: the question misread. The equation is internally
    consistent, so spotting it takes comparing the reply with the question (learnable by a tiny
    model in minutes), not checking the arithmetic."""
    a, b, op = p["a"], p["b"], p["op"]
    misreadings = [(b, op, a)] if op == "-" and a != b else []  # operands swapped
    misreadings.append((a, "-" if op == "+" else "+", b) if b else (a, op, b + 1))  # wrong operator
    misreadings.append((a, op, (b + rng.choice([1, 2, 3, 7])) % 10))  # the digit misread
    misreadings.append(((a + rng.choice([1, 2, 10, 20])) % 100, op, b))  # the number misread
    x, wrong_op, y = rng.choice(misreadings)
    return f"{x} {wrong_op} {y} = {x + y if wrong_op == '+' else x - y}"


def slipped_solution(p: dict) -> str | None:
    """The solution with its carry or borrow forgotten (47 + 5 = 42, 41 - 7 = 44): the tens digit left
    as the question's; None where there is none to forget (and for a one-digit number minus a
    larger digit, whose result is negative)."""
    a, b, op = p["a"], p["b"], p["op"]
    if op == "+" and a % 10 + b >= 10:
        return f"{a} + {b} = {a + b - 10}"
    if op == "-" and a % 10 < b and a >= 10:
        return f"{a} - {b} = {a - b + 10}"
    return None


def _with_slips(sft: list[dict], rng: random.Random, rate: float) -> list[dict]:
    """The conversations with each reply that has a carry or borrow replaced, at `rate`, by its slip."""
    slips = {}
    for a, op, b in TRIPLES:
        p = {"a": a, "b": b, "op": op}
        if (wrong := slipped_solution(p)) is not None:
            slips[f"{a} {op} {b} = {a + b if op == '+' else a - b}"] = wrong
    out = []
    for record in sft:
        turns = [dict(t, value=slips[t["value"]]) if t["from"] == "gpt" and t["value"] in slips
                 and rng.random() < rate else t for t in record["conversations"]]
        out.append({"conversations": turns})
    return out


def _pt_document(problems: list[dict]) -> str:
    return " ".join(f"{p['a']} {WORDS[p['op']]} {p['b']} equals {p['answer']}." for p in problems)


def _sft_record(problems: list[dict], rng: random.Random) -> dict:
    turns = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
    for p in problems:
        turns += [{"from": "human", "value": p["question"]}, {"from": "gpt", "value": p["solution"]}]
    return {"conversations": turns}


def _records(problems: list[dict], rng: random.Random) -> dict[str, list]:
    pt, sft, i = [], [], 0
    while i < len(problems):  # PT documents of 2-5 facts
        k = rng.randint(2, 5)
        if len(problems) - i - k == 1:  # never leave a one-fact document at the end
            k += 1 if k < 5 else -1
        pt.append(_pt_document(problems[i:i + k]))
        i += k
    i = 0
    while i < len(problems):  # about a quarter of conversations have 2-3 exchanges
        k = rng.randint(2, 3) if rng.random() < 0.25 else 1
        sft.append(_sft_record(problems[i:i + k], rng))
        i += k
    pref = [{"conversations": [{"from": "human", "value": p["question"]}], "chosen": p["solution"],
             "rejected": _wrong(p, rng)} for p in problems]
    rl = [{"question": p["question"], "answer": str(p["answer"])} for p in problems]
    return {"pt": pt, "sft": sft, "pref": pref, "rl": rl}


def _unpaired(pref: list[dict], seed: int) -> list[dict]:
    """KTO's unpaired feedback from the pairs: each pair's chosen reply as a desirable example and its
    rejected reply as an undesirable one, shuffled (its own generator: the other files do not change),
    so a batch mixes prompts and labels."""
    records = [{"prompt": [{"role": "user", "content": p["conversations"][0]["value"]}],
                "completion": [{"role": "assistant", "content": p[side]}], "label": side == "chosen"}
               for p in pref for side in ("chosen", "rejected")]
    random.Random(seed).shuffle(records)
    return records


def write_demo_data(out_dir, seed: int = 0, n_train: int = 1600, n_val: int = 200, n_test: int = 200) -> dict[str, Path]:
    """Write every file in DEMO_FILES to `out_dir` (deterministic in `seed`), then the stamp
    `demo_spec.json` (ensure_demo_data); returns name -> path."""
    train, val = _split_problems(seed, n_train, n_val)
    test = _test_problems(seed, n_train, n_val, n_test)
    rng = random.Random(seed + 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in (("train", train), ("val", val), ("test", test)):
        records = _records(problems, random.Random(seed + 3) if split == "test" else rng)
        if split != "test":  # KTO's unpaired feedback: the pairs' replies, each with its label
            records["unpaired"] = _unpaired(records["pref"], seed + (2 if split == "train" else 3))
        if split == "train":  # its own generator: the other files stay what they were
            records["sft_slips"] = _with_slips(records["sft"], random.Random(seed + 4), CARRY_SLIP_RATE)
        for kind, items in records.items():
            if f"{kind}_{split}" not in DEMO_FILES:  # no PT test text
                continue
            path = out / DEMO_FILES[f"{kind}_{split}"]
            if kind == "pt":
                write_text_atomic(path, "\n\n".join(items) + "\n")
            else:
                write_jsonl(path, items)
            paths[f"{kind}_{split}"] = path
    write_spec(out / "demo_spec.json", _spec(seed))
    return paths


def ensure_demo_data(out_dir, seed: int = 0, n_train: int = 1600, n_val: int = 200) -> dict[str, Path]:
    """The demo files in `out_dir`, written when any is missing or the stamp `demo_spec.json` beside them
    names another seed or an older DEMO_DATA_VERSION (files of other sizes, as tests write, are kept)."""
    out = Path(out_dir)
    paths = {name: out / file for name, file in DEMO_FILES.items()}
    if is_current(out / "demo_spec.json", _spec(seed), paths.values()):
        return paths
    return write_demo_data(out, seed, n_train, n_val)


def _spec(seed: int) -> dict:
    return {"version": DEMO_DATA_VERSION, "seed": seed}


def ensure_configured(data) -> None:
    """The files the data config generates, written on first use: the demo files `data.demo` ({dir, seed})
    names (`task: agent`: the agent demo's, llm_stages/data/demo_agent.py), and whatever `data.generate` ({_target_: a function that writes data.path when it is missing or
    stale, with its keyword arguments}) writes, e.g. a reasoning-gym task. Nothing when both are unset.
    What the DataModule's prepare_data and `inspect` both do before reading."""
    demo = data.get("demo")
    if demo and demo.get("task") == "agent":
        from llm_stages.data.demo_agent import ensure_agent_data

        ensure_agent_data(demo["dir"], seed=demo["seed"])
    elif demo:
        ensure_demo_data(demo["dir"], seed=demo["seed"])
    if data.get("generate"):
        from hydra.utils import instantiate

        instantiate(data["generate"], _convert_="all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1600)
    parser.add_argument("--n-val", type=int, default=200)
    args = parser.parse_args()
    for path in write_demo_data(args.out_dir, args.seed, args.n_train, args.n_val).values():
        print(path)


if __name__ == "__main__":
    main()
