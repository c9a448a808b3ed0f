"""OpenEnv environments as episode environments (llm_stages/envs/openenv.py): reset, the tools the
protocol finds (as TRL's environment_factory does: the class's public functions) with the
environment's own schemas, get_reward, errors. Slow: importing openenv-core takes ~10 s (it loads
gradio); skipped where openenv-core is not installed (pip install 'llm_stages[openenv]')."""

from __future__ import annotations

import inspect
import sys

import pytest

from llm_stages.envs import openenv as openenv_env
from llm_stages.errors import ConfigError


def test_missing_extra_is_one_line_naming_the_install(monkeypatch):
    for name in ("openenv", "openenv.core", "openenv.core.env_server", "openenv.core.env_server.mcp_environment"):
        monkeypatch.setitem(sys.modules, name, None)  # imports now fail as if openenv-core were absent
    with pytest.raises(ConfigError) as error:
        openenv_env.OpenEnvTools(object)
    assert str(error.value) == ("llm_stages.envs.openenv needs openenv-core, which is not installed: "
                                "pip install 'llm_stages[openenv]' (or pip install openenv-core)")


@pytest.fixture(scope="module")
def games():
    pytest.importorskip("openenv.core.env_server.mcp_environment")
    from tests.unit import openenv_games

    return openenv_games


def tool_names(environment) -> list[str]:
    """The tools TRL's GRPOTrainer finds on an environment (grpo_trainer.py, environment_factory)."""
    return [name for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


@pytest.mark.slow
def test_mcp_environment_tools_reset_and_reward(games):
    from transformers.utils import get_json_schema

    env = openenv_env.OpenEnvTools(games.GuessNumber)
    assert type(env).__name__ == "OpenEnvGuessNumber"  # the reward component's name
    assert tool_names(env) == ["guess", "hint"]
    assert get_json_schema(type(env).guess)["function"] == {
        "name": "guess", "description": "Guess the secret number.",
        "parameters": {"type": "object", "properties": {"number": {"type": "integer", "description": "your guess"}},
                       "required": ["number"]},
        "return": {"type": "string", "description": "The environment's observation as text."}}
    assert get_json_schema(type(env).hint)["function"]["parameters"] == {
        "type": "object", "properties": {"kind": {"type": "string", "description":
                                                  "parity (odd or even) or half (lower or upper half)"}}}

    # reset gets the record's fields (the environment takes `secret`; the rest goes to its **kwargs)
    assert env.reset(prompt="Find the number.", secret=30, answer="30") == "I picked a number between 1 and 100."
    assert env.hint() == "even" and env.hint(kind="half") == "lower half"
    assert [env.guess(number=50), env.guess(number=20)] == ["lower", "higher"]
    with pytest.raises(RuntimeError, match="101 is outside 1..100"):
        env.guess(number=101)  # the tool's error: text for the model, no reward
    assert env.guess(number=30) == "correct"
    assert env.get_reward() == pytest.approx(0.8)  # -0.1 - 0.1 + 1
    with pytest.raises(RuntimeError, match="the episode is over"):
        env.guess(number=30)

    # a new episode on the same instance (TRL reuses them) starts from nothing
    assert env.reset(secret=7) is not None and env.get_reward() == 0.0
    assert env.guess(number=7) == "correct" and env.get_reward() == 1.0


@pytest.mark.slow
def test_configured_as_rollout_environment(games):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llm_stages.rollout.rollout import environment_class

    config = OmegaConf.create({"_target_": "llm_stages.envs.openenv.OpenEnvTools", "_partial_": True,
                               "reward": "last",
                               "env": {"_target_": "tests.unit.openenv_games.GuessNumber", "_partial_": True,
                                       "high": 10}})
    factory = instantiate(config)
    # the runner tells from the configured class, before any episode, that the environment owns a reward
    assert callable(getattr(environment_class(factory), "get_reward", None))
    first, second = factory(), factory()  # one environment per episode
    assert first.env is not second.env and type(first) is type(second)
    first.reset(secret=4)
    second.reset(secret=9)
    assert (first.guess(number=9), second.guess(number=9)) == ("lower", "correct")
    with pytest.raises(RuntimeError, match="11 is outside 1..10"):
        first.guess(number=11)
    first.guess(number=4)
    assert (first.get_reward(), second.get_reward()) == (1.0, 1.0)  # reward=last: the final step's


@pytest.mark.slow
def test_plain_environment_acts_through_its_action_class(games):
    from transformers.utils import get_json_schema

    env = openenv_env.OpenEnvTools(games.Counter, action=games.MoveAction, action_name="move")
    assert tool_names(env) == ["move"]
    assert get_json_schema(type(env).move)["function"]["parameters"] == {
        "type": "object", "properties": {"steps": {"type": "integer", "description": "how far to move (negative: down)"}},
        "required": ["steps"]}
    assert get_json_schema(type(env).move)["function"]["description"] == "Move the counter towards the target."
    assert env.reset(target=2, prompt="ignored: reset takes no **kwargs") == '{"position": 0, "target": 2}'
    assert env.move(steps=3) == '{"position": 3, "target": 2}'
    assert env.move(steps=-1) == '{"position": 2, "target": 2}'
    assert env.get_reward() == 1.0 and env.done

    focused = openenv_env.OpenEnvTools(games.Counter, action=games.MoveAction, observation_field="position")
    assert focused.reset(target=1) == "0" and focused.act(steps=1) == "1"


@pytest.mark.slow
def test_configuration_mistakes_are_one_line(games):
    with pytest.raises(ConfigError, match=r"^rollout.environment.env: Counter is an OpenEnv Environment without MCP "
                                          r"tools; set rollout.environment.action"):
        openenv_env.OpenEnvTools(games.Counter)
    with pytest.raises(ConfigError, match=r"^rollout.environment.reward='mean': sum .* or last"):
        openenv_env.OpenEnvTools(games.GuessNumber, reward="mean")
    env = openenv_env.OpenEnvTools(games.Counter, action=games.MoveAction, observation_field="speed")
    with pytest.raises(ConfigError, match=r"observation_field='speed': CounterObservation has \['position', 'target'\]"):
        env.reset()
