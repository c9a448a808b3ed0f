"""An OpenEnv environment in real episodes (EpisodeRunner with scripted turns): its tools offered in
the prompt, called by name, their results and errors as tool turns, its reward per episode. Slow:
importing openenv-core takes ~10 s; skipped where it is not installed (pip install 'llm_stages[openenv]')."""

from __future__ import annotations

import functools

import pytest

from tests.integration.test_episodes import _ids, _prompts, _runner, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def _guess(number: int) -> str:
    return f'<tool_call>\n{{"name": "guess", "arguments": {{"number": {number}}}}}\n</tool_call>'


def test_openenv_environment_in_episodes(tiny_tokenizer, capsys):
    pytest.importorskip("openenv.core.env_server.mcp_environment")
    from llm_stages.envs.openenv import OpenEnvTools
    from tests.unit.openenv_games import GuessNumber

    tok = tiny_tokenizer
    environment = functools.partial(OpenEnvTools, env=functools.partial(GuessNumber, high=10))
    turns = [[_ids(tok, _guess(9)), _ids(tok, _guess(11))],        # first turn of each episode
             [_ids(tok, _guess(4)), _ids(tok, "I give up.")],
             [_ids(tok, "Found it: 4.")]]
    runner, _ = _runner(tok, turns, tools=(), environment=environment)
    sample, episodes = runner.run(None, _prompts(tok, ["Find the number.", "Find the number."],
                                                 [{"secret": 4}, {"secret": 9}]),
                                  repeats=1, generation={"max_new_tokens": 256}, seed=0)
    prompt = tok.decode(sample.query[0][sample.query_mask[0].bool()])
    assert '"name": "guess"' in prompt and '"name": "hint"' in prompt and "get_reward" not in prompt
    assert episodes[0].messages[0]["content"] == "Find the number.I picked a number between 1 and 10."
    tool_turns = [[m["content"] for m in e.messages if m["role"] == "tool"] for e in episodes]
    assert tool_turns[0] == ["lower", "correct"]
    assert tool_turns[1] == ["error: guess raised RuntimeError: 11 is outside 1..10"]
    assert [e.turns for e in episodes] == [3, 2]
    assert [e.environment.get_reward() for e in episodes] == [pytest.approx(0.9), 0.0]
    assert "Traceback" not in capsys.readouterr().err  # a failed call is the model's, not a fault to print
