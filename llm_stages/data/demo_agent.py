"""The agent demo task: three-digit multiplication, which a ~1M-parameter model cannot do in its
head but can do by calling a calculator tool and copying the result.

SFT transcripts (`{"messages", "tools"}`): three-digit additions and subtractions always call the
calculator (they teach the call's format, copying the operands into it and the result out of it);
multiplications call it in only a fraction of the replies (`TOOL_FRACTION`) and otherwise answer
from memory — the right product, which the model cannot learn, so it learns to write a five- or
six-digit guess. After SFT the model calls the tool on about that fraction of new multiplications
and copies correctly when it does, so GRPO with the calculator as a live tool starts low and has
one clear thing to learn: call it. RL prompts (multiplications only) are `{"question", "answer"}`.
Generated deterministically from a seed:

    python -m llm_stages.data.demo_agent OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from llm_stages.data.generated import is_current, write_jsonl, write_spec

# The generator's format: bump it when what write_agent_data writes changes, so that files an older
# version wrote are rewritten on the next run (ensure_agent_data) rather than trained on.
AGENT_DATA_VERSION = 1
AGENT_FILES = {
    "sft_train": "sft_train.jsonl", "sft_val": "sft_val.jsonl", "sft_test": "sft_test.jsonl",
    "rl_train": "rl_train.jsonl", "rl_val": "rl_val.jsonl", "rl_test": "rl_test.jsonl",
}
# The calculator's schema exactly as the RL prompts show it (`rollout.tools`: llm_stages.rollout.tools
# reads it off llm_stages.rollout.builtin_tools.calculator; tests/unit/test_demo_agent_schema.py keeps
# the two equal): the tiny template has no tool support, so it is a ~310-token system turn the tiny
# model learns as fixed text.
CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "Numbers with + - * / // % ** and parentheses, for example \"(2 + 3) * 4 ** 2\"."
                }
            },
            "required": [
                "expression"
            ]
        },
        "return": {
            "type": "string",
            "description": "The value: an integer when the result is whole, else a decimal number."
        }
    }
}
QUESTION_TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}."]
TOOL_FRACTION = 0.1  # of the multiplications in the SFT transcripts
SIZES = {"train": 4000, "val": 100, "test": 200}  # multiplications per split; as many additions/subtractions in SFT
# Questions per SFT transcript: the ~180-token schema turn is paid once for several exchanges.
EXCHANGES = 3


def make_problem(a: int, op: str, b: int, rng: random.Random) -> dict:
    answer = a * b if op == "*" else a + b if op == "+" else a - b
    question = rng.choice(QUESTION_TEMPLATES).format(a=a, op=op, b=b)
    return {"question": question, "op": op, "expression": f"{a}{op}{b}", "answer": str(answer)}


def split_problems(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Per split, distinct multiplications and as many additions and subtractions (a >= b), a and b
    in 100..999; no (a, op, b) in two splits."""
    rng = random.Random(seed)
    total = sum(sizes.values())
    products: set[tuple[int, str, int]] = set()
    others: set[tuple[int, str, int]] = set()
    while len(products) < total or len(others) < total:
        a, b, op = rng.randrange(100, 1000), rng.randrange(100, 1000), rng.choice("*+-")
        (products if op == "*" else others).add((max(a, b), op, min(a, b)) if op == "-" else (a, op, b))
    products, others = sorted(products)[:total], sorted(others)[:total]
    rng.shuffle(products)
    rng.shuffle(others)
    splits, start = {}, 0
    for name, n in sizes.items():
        problems = products[start:start + n] + others[start:start + n]
        splits[name] = [make_problem(*t, rng) for t in problems]
        start += n
    return splits


def exchange(problem: dict, use_tool: bool) -> list[dict]:
    """One question and its replies: a calculator call, its result and the answer, or the answer alone."""
    messages = [{"role": "user", "content": problem["question"]}]
    if use_tool:
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": problem["expression"]}}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculator", "content": problem["answer"]}]
    return messages + [{"role": "assistant", "content": problem["answer"]}]


def transcripts(problems: list[dict], uses_tool: list[bool]) -> list[dict]:
    """SFT records of EXCHANGES questions each, `{"messages", "tools"}`."""
    records = []
    for start in range(0, len(problems), EXCHANGES):
        messages = [m for p, tool in zip(problems[start:start + EXCHANGES], uses_tool[start:start + EXCHANGES])
                    for m in exchange(p, tool)]
        records.append({"messages": messages, "tools": [CALCULATOR_SCHEMA]})
    return records


def write_agent_data(out_dir, seed: int = 0, tool_fraction: float = TOOL_FRACTION,
                     sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Every file in AGENT_FILES in `out_dir` (deterministic in `seed`); returns name -> path. The test
    split's transcripts all call the tool: their held-out loss measures the tool-use format."""
    splits = split_problems(seed, sizes or SIZES)
    rng = random.Random(seed + 1)
    out = Path(out_dir)
    paths = {}
    for split, problems in splits.items():
        mixed = rng.sample(problems, len(problems))
        uses_tool = [split == "test" or p["op"] != "*" or rng.random() < tool_fraction for p in mixed]
        records = {"sft": transcripts(mixed, uses_tool),
                   "rl": [{"question": p["question"], "answer": p["answer"]} for p in problems if p["op"] == "*"]}
        for kind, items in records.items():
            path = out / AGENT_FILES[f"{kind}_{split}"]
            write_jsonl(path, items)
            paths[f"{kind}_{split}"] = path
    write_spec(out / "demo_agent_spec.json", _spec(seed))
    return paths


def ensure_agent_data(out_dir, seed: int = 0) -> dict[str, Path]:
    """The agent demo files in `out_dir`, written when any is missing or the stamp `demo_agent_spec.json`
    beside them names another seed or an older AGENT_DATA_VERSION."""
    out = Path(out_dir)
    paths = {name: out / file for name, file in AGENT_FILES.items()}
    if is_current(out / "demo_agent_spec.json", _spec(seed), paths.values()):
        return paths
    return write_agent_data(out, seed)


def _spec(seed: int) -> dict:
    return {"version": AGENT_DATA_VERSION, "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tool-fraction", type=float, default=TOOL_FRACTION)
    args = parser.parse_args()
    for path in write_agent_data(args.out_dir, args.seed, args.tool_fraction).values():
        print(path)


if __name__ == "__main__":
    main()
