"""The eval stage's episode tasks: an agent's success rate on held-out prompts, scored as RL scores episodes."""

import json
from pathlib import Path

import pytest

from llm_stages.errors import ConfigError
from llm_stages.evaluate.run import evaluate
from tests.integration.test_eval import FACTS, eval_cfg, setup  # noqa: F401  (setup: the module's fixture)

# An environment without tools: the prompt renders as in training, so the memorised model answers it.
SILENT = {"_target_": "tests.integration.test_episodes.Silent", "_partial_": True}
CORRECT = {"correct": {"weight": 1.0, "fn": {"_target_": "llm_stages.rollout.rewards.answer_match", "_partial_": True}}}


def episode_task(path, **settings) -> dict:
    return {"type": "episodes", "data": {"path": str(path)}, "environment": SILENT, "rewards": CORRECT,
            "episode": {"max_turns": 2}, "generation": {"max_new_tokens": 8, "do_sample": False}, **settings}


def test_success_rate_of_episodes(setup, make_cfg, tmp_path):  # noqa: F811
    tasks = {"agent": episode_task(setup["prompts"])}
    memorised = evaluate(eval_cfg(make_cfg, tmp_path / "m", setup["root"] / "memorised", tasks))
    fresh = evaluate(eval_cfg(make_cfg, tmp_path / "f", setup["root"] / "fresh", tasks))
    metrics = memorised["tasks"]["agent"]["metrics"]
    # The memorised model answers in one turn, every answer right.
    assert metrics["success_rate"] == 1.0 and metrics["reward_mean"] == 1.0 and metrics["turns_mean"] == 1.0
    assert fresh["tasks"]["agent"]["metrics"]["success_rate"] == 0.0
    rows = [json.loads(line) for line in Path(memorised["tasks"]["agent"]["episodes"]).read_text().splitlines()]
    assert len(rows) == len(FACTS) and all(r["success"] for r in rows)
    assert [r["messages"][-1]["content"] for r in rows] == [a for _, a in FACTS]


def test_an_episode_task_without_tools_is_one_line(setup, make_cfg, tmp_path):  # noqa: F811
    task = episode_task(setup["prompts"], environment=None)
    with pytest.raises(ConfigError, match=r"eval.tasks.agent \(type: episodes\) needs tools and/or an environment"):
        evaluate(eval_cfg(make_cfg, tmp_path / "x", setup["root"] / "fresh", {"agent": task}))
