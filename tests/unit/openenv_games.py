"""Two small OpenEnv environments for tests/unit/test_envs_openenv.py, written against openenv-core's
server-side interface as an environment package would be: an MCP one (tools) and a plain one (an
Action class). Imported only where openenv-core is installed."""

from __future__ import annotations

from fastmcp import FastMCP
from pydantic import Field
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.mcp_environment import MCPEnvironment
from openenv.core.env_server.types import Action, Observation, State


class GuessObservation(Observation):
    text: str = ""


class GuessNumber(MCPEnvironment):
    """Find a secret number in 1..100 by guessing; each wrong guess costs 0.1, the right one earns 1."""

    def __init__(self, low: int = 1, high: int = 100):
        mcp = FastMCP("guess-number")

        @mcp.tool()
        def guess(number: int) -> str:
            """Guess the secret number.

            Args:
                number: your guess
            """
            if not self.low <= number <= self.high:
                raise ValueError(f"{number} is outside {self.low}..{self.high}")
            self.guesses += 1
            self.won = number == self.secret
            return "correct" if self.won else ("higher" if number < self.secret else "lower")

        @mcp.tool()
        def hint(kind: str = "parity") -> str:
            """A hint about the secret number.

            Args:
                kind: parity (odd or even) or half (lower or upper half)
            """
            if kind == "parity":
                return "even" if self.secret % 2 == 0 else "odd"
            return "lower half" if self.secret <= (self.low + self.high) // 2 else "upper half"

        super().__init__(mcp)
        self.low, self.high = low, high
        self.secret, self.guesses, self.won = 0, 0, False

    def reset(self, seed=None, episode_id=None, secret: int = 42, **kwargs) -> GuessObservation:
        self.secret, self.guesses, self.won = int(secret), 0, False
        return GuessObservation(text=f"I picked a number between {self.low} and {self.high}.")

    def step(self, action, timeout_s=None, **kwargs):
        observation = super().step(action, timeout_s=timeout_s, **kwargs)
        if getattr(observation, "tool_name", None) == "guess" and observation.error is None:
            observation.done = self.won
            observation.reward = 1.0 if self.won else -0.1
        return observation

    def _step_impl(self, action, timeout_s=None, **kwargs):
        raise ValueError(f"{type(action).__name__}: this environment acts through its tools")

    @property
    def state(self) -> State:
        return State(step_count=self.guesses)


class MoveAction(Action):
    """Move the counter towards the target."""

    steps: int = Field(description="how far to move (negative: down)")


class CounterObservation(Observation):
    position: int = 0
    target: int = 0


class Counter(Environment):
    """Reach a target position; the reward is 1 on arrival."""

    def __init__(self):
        super().__init__()
        self.position, self.target, self.moves = 0, 0, 0

    def reset(self, seed=None, episode_id=None, target: int = 3) -> CounterObservation:
        self.position, self.target, self.moves = 0, int(target), 0
        return CounterObservation(position=0, target=self.target)

    def step(self, action: MoveAction, timeout_s=None, **kwargs) -> CounterObservation:
        self.position += action.steps
        self.moves += 1
        arrived = self.position == self.target
        return CounterObservation(position=self.position, target=self.target, done=arrived,
                                  reward=1.0 if arrived else 0.0)

    @property
    def state(self) -> State:
        return State(step_count=self.moves)
