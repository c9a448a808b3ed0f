"""reasoning-gym tasks (`pip install 'llm_stages[envs]'`) as RL prompts, scored by the task's own verifier.

Records `{"prompt": question, "answer", "task", "task_config", "metadata", "system"}` are written as
JSON Lines that `data=file` reads like any prompt file (every field reaches the rewards as `fields`):

    python -m llm_stages.envs.reasoning_gym --task leg_counting --size 200 --val-size 50 \\
        --out data/reasoning_gym/leg_counting_train.jsonl     # and leg_counting_val.jsonl beside it

or on first use, from the data config (`data=reasoning_gym data.task=leg_counting`; `data.generate`
calls `ensure_task_data`). The reward `score` reads the reply's last `<answer>...</answer>` as
reasoning-gym's `extract_answer` does and returns the task's `score_answer` for it (0 without one).
Train and validation are one generated dataset split in two, so no question is in both.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from llm_stages.data.generated import is_current, write_jsonl, write_spec
from llm_stages.envs import require
from llm_stages.errors import ConfigError
from llm_stages.rollout.rewards import reads

EXTRA = "envs"
# How many records of a new file have their verifier checked against the JSON copy of their metadata.
CHECKED_RECORDS = 20


def _reasoning_gym():
    return require("reasoning_gym", "reasoning-gym", EXTRA, "llm_stages.envs.reasoning_gym")


def task_names() -> list[str]:
    """Every task reasoning-gym registers."""
    return sorted(_reasoning_gym().factory.DATASETS)


@functools.lru_cache(maxsize=64)
def _dataset(task: str, config_json: str, seed: int = 0, size: int = 1):
    rg = _reasoning_gym()
    config = json.loads(config_json)
    if task not in task_names():
        raise ConfigError(f"reasoning-gym has no task {task!r}; one of: {', '.join(task_names())}")
    try:
        return rg.create_dataset(task, **config, seed=seed, size=size)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"reasoning-gym task {task!r} refuses the config {config}: {e} "
                          "(the fields of its config class are the allowed keys)") from None


def _config_json(config: Mapping | None) -> str:
    return json.dumps(dict(config or {}), sort_keys=True)


def task_records(task: str, size: int, seed: int = 0, config: Mapping | None = None,
                 system_prompt: str | None = "default") -> list[dict]:
    """`size` records of `task` (generated from `seed`; `config`: the task's config fields, e.g.
    {"min_animals": 3}); `system_prompt`: a name in reasoning-gym's SYSTEM_PROMPTS (it asks for the
    `<answer>` tags `score` reads), or None for no system turn."""
    rg = _reasoning_gym()
    prompts = rg.utils.SYSTEM_PROMPTS
    if system_prompt is not None and system_prompt not in prompts:
        raise ConfigError(f"system prompt {system_prompt!r} is not one of reasoning-gym's: "
                          f"{', '.join(prompts)} (or none)")
    dataset = _dataset(task, _config_json(config), seed, size)
    records = []
    for index, entry in enumerate(dataset):
        record = {"prompt": entry["question"], "answer": entry["answer"], "task": task,
                  "task_config": dict(config or {}), "metadata": _jsonable(entry.get("metadata") or {})}
        if system_prompt is not None:
            record["system"] = prompts[system_prompt]
        if index < CHECKED_RECORDS:
            _check_roundtrip(task, entry, record)
        records.append(record)
    return records


def _jsonable(value):
    """`value` as JSON holds it: tuples as lists, sets sorted, numpy scalars and arrays as numbers and lists."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if hasattr(value, "tolist"):  # numpy
        return value.tolist()
    return str(value)


def _check_roundtrip(task: str, entry: dict, record: dict) -> None:
    """The verifier gives the reference answer the same score from the JSON copy as from the original."""
    verifier = _dataset(task, _config_json(record["task_config"])).score_answer
    original = verifier(entry["answer"], entry)
    copied = verifier(record["answer"], _entry(record))
    if original != copied:
        raise ConfigError(f"reasoning-gym task {task!r}: its metadata does not survive JSON (the verifier scores "
                          f"the reference answer {original} from the original, {copied} from the copy); "
                          "this task cannot be written to a data file")


def _entry(record: Mapping) -> dict:
    """The dataset entry a verifier expects, rebuilt from a record."""
    return {"question": record.get("prompt"), "answer": record.get("answer"), "metadata": record.get("metadata") or {}}


def write_task_data(out: str | Path, task: str, size: int, val_size: int = 0, seed: int = 0,
                    config: Mapping | None = None, system_prompt: str | None = "default") -> dict[str, Path]:
    """`size` training records at `out` (`<name>_train.jsonl`) and `val_size` validation records beside
    it (`<name>_val.jsonl`, which `data.val_path=auto` finds); one dataset of size + val_size split in two."""
    out = Path(out)
    if not out.name.endswith("_train.jsonl"):
        raise ConfigError(f"--out {out}: name the training file <name>_train.jsonl (the validation file is "
                          "written beside it as <name>_val.jsonl)")
    records = task_records(task, size + val_size, seed, config, system_prompt)
    paths = {"train": out}
    write_jsonl(out, records[:size])
    if val_size:
        paths["val"] = out.with_name(out.name.replace("_train.jsonl", "_val.jsonl"))
        write_jsonl(paths["val"], records[size:])
    return paths


def ensure_task_data(out: str | Path, task: str, size: int, val_size: int = 0, seed: int = 0,
                     config: Mapping | None = None, system_prompt: str | None = "default") -> dict[str, Path]:
    """`write_task_data`, unless the files at `out` were written with these very settings (kept in
    `<name>_spec.json` beside them): what `data.generate` calls before the data is read."""
    out = Path(out)
    spec = {"task": task, "size": size, "val_size": val_size, "seed": seed, "config": dict(config or {}),
            "system_prompt": system_prompt}
    spec_file = out.with_name(out.name.replace("_train.jsonl", "_spec.json"))
    if is_current(spec_file, spec, [out]):
        return {"train": out}
    paths = write_task_data(out, task, size, val_size, seed, config, system_prompt)
    write_spec(spec_file, spec)
    return paths


# --- reward --------------------------------------------------------------------------------------

def extract_answer(completion: str) -> str | None:
    """The reply's last `<answer>...</answer>`, stripped, as reasoning-gym reads it; None without one."""
    return _reasoning_gym().utils.extract_answer(completion)


@reads("fields.task", "fields.metadata")
def score(completions: list[str], fields: list[Mapping] | None = None, **_) -> list[float]:
    """The task's own verifier (`score_answer`) on each reply's `<answer>`: 1.0 for a right answer,
    partial credit where the task gives it, 0.0 for a wrong or missing one."""
    if fields is None or any(record is None for record in fields):
        raise ConfigError("llm_stages.envs.reasoning_gym.score reads each prompt's data record (its task and "
                          "metadata), but this rollout passes the rewards no fields=")
    scores = []
    for completion, record in zip(completions, fields):
        if not record.get("task"):
            raise ConfigError(f"llm_stages.envs.reasoning_gym.score: a prompt record has no 'task' field (keys: "
                              f"{sorted(record)}); write the data with python -m llm_stages.envs.reasoning_gym")
        verifier = _dataset(record["task"], _config_json(record.get("task_config"))).score_answer
        scores.append(float(verifier(extract_answer(completion), _entry(record))))
    return scores


# --- command line --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a reasoning-gym task as RL prompt files (JSON Lines).")
    parser.add_argument("--task", help="a reasoning-gym task, e.g. leg_counting (--list: all of them)")
    parser.add_argument("--size", type=int, default=1000, help="training records")
    parser.add_argument("--val-size", type=int, default=100, help="validation records, written beside --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help='the task\'s config fields as JSON, e.g. \'{"max_animals": 5}\'')
    parser.add_argument("--system-prompt", default="default", help="a reasoning-gym system prompt name, or none")
    parser.add_argument("--out", help="the training file, <name>_train.jsonl")
    parser.add_argument("--list", action="store_true", help="print the task names and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print("\n".join(task_names()))
            return
        if not args.task or not args.out:
            raise ConfigError("--task and --out are required (--list prints the tasks)")
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {args.config!r} is not JSON ({e.msg}); e.g. '{{\"max_animals\": 5}}'") from None
        system_prompt = None if args.system_prompt.lower() == "none" else args.system_prompt
        paths = write_task_data(args.out, args.task, args.size, args.val_size, args.seed, config, system_prompt)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
