"""The agent demo task: three-digit multiplication, which a ~1M-parameter model cannot do in its
head but can do by calling a calculator tool and copying the result.

SFT transcripts (`{"messages", "tools"}`) show the calculator in only a fraction of the replies
(`TOOL_FRACTION`); the others answer from memory — the right product, which the model cannot
learn, so it learns to write a five- or six-digit guess. After SFT the model calls the tool on
about that fraction of new questions and copies the result correctly, so GRPO with the calculator
as a live tool starts low and has one clear thing to learn: call it. RL prompts are
`{"question", "answer"}`. Generated deterministically from a seed:

    python -m llm_stages.data.demo_agent OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llm_stages.training.run_dir import write_text_atomic

AGENT_FILES = {
    "sft_train": "sft_train.jsonl", "sft_val": "sft_val.jsonl", "sft_test": "sft_test.jsonl",
    "rl_train": "rl_train.jsonl", "rl_val": "rl_val.jsonl", "rl_test": "rl_test.jsonl",
}
# The calculator's schema as the prompt shows it (the tiny template has no tool support, so the
# schema is a system turn: ~180 tokens; every word here costs prompt length in every rollout).
CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
QUESTION_TEMPLATES = ["What is {a} * {b}?", "Compute {a} * {b}.", "{a} times {b}?"]
TOOL_FRACTION = 0.1
SIZES = {"train": 2000, "val": 100, "test": 200}


def make_problem(a: int, b: int, rng: random.Random) -> dict:
    return {"question": rng.choice(QUESTION_TEMPLATES).format(a=a, b=b), "expression": f"{a}*{b}", "answer": str(a * b)}


def split_problems(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Disjoint splits of distinct (a, b) pairs, a and b in 100..999."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    total = sum(sizes.values())
    while len(pairs) < total:
        pairs.add((rng.randrange(100, 1000), rng.randrange(100, 1000)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name] = [make_problem(a, b, rng) for a, b in ordered[start:start + n]]
        start += n
    return splits


def transcript(problem: dict, use_tool: bool) -> dict:
    """One SFT record: the question, then either a calculator call, its result and the answer, or the
    answer alone."""
    messages = [{"role": "user", "content": problem["question"]}]
    if use_tool:
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": problem["expression"]}}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculator", "content": problem["answer"]}]
    messages.append({"role": "assistant", "content": problem["answer"]})
    return {"messages": messages, "tools": [CALCULATOR_SCHEMA]}


def write_agent_data(out_dir, seed: int = 0, tool_fraction: float = TOOL_FRACTION,
                     sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Every file in AGENT_FILES in `out_dir` (deterministic in `seed`); returns name -> path. The test
    split's transcripts all use the tool: their held-out loss measures the tool-use format."""
    splits = split_problems(seed, sizes or SIZES)
    rng = random.Random(seed + 1)
    out = Path(out_dir)
    paths = {}
    for split, problems in splits.items():
        records = {
            "sft": [transcript(p, split == "test" or rng.random() < tool_fraction) for p in problems],
            "rl": [{"question": p["question"], "answer": p["answer"]} for p in problems],
        }
        for kind, items in records.items():
            path = out / AGENT_FILES[f"{kind}_{split}"]
            write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
            paths[f"{kind}_{split}"] = path
    return paths


def ensure_agent_data(out_dir, seed: int = 0) -> dict[str, Path]:
    """The agent demo files in `out_dir`, written only if any is missing."""
    paths = {name: Path(out_dir) / file for name, file in AGENT_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    return write_agent_data(out_dir, seed)


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
