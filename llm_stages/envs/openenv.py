"""An OpenEnv environment (`pip install 'llm_stages[openenv]'`) as an episode environment of the
`rollout.environment` protocol: `reset(**record)` returns the first observation as text, the
environment's tools are public methods with Google-style docstrings, `get_reward()` is the episode's reward.

The environment runs in this process, as OpenEnv's own server runs it: its `Environment` subclass,
`reset(...)` and `step(action)`, no HTTP server or container. Configure it as

    rollout:
      environment:
        _target_: llm_stages.envs.openenv.OpenEnvTools
        _partial_: true
        env: {_target_: my_env.server.MyEnvironment, _partial_: true}    # a new one per episode
        action: null              # plain environments: {_target_: my_env.models.MyAction, _partial_: true}

- An `MCPEnvironment` (OpenEnv's tool interface): each of its MCP tools becomes a method of the same
  name, parameters and description; a call is `env.step(CallToolAction(tool_name, arguments))`.
- Any other `Environment`: one method, `action_name` (default `act`), whose parameters are the fields
  of `action` (the environment's `Action` class); a call is `env.step(Action(**arguments))`.

A tool returns the observation as text (its tool result, or its fields other than done, reward and
metadata); a tool error, or a call after the episode is done, raises, which the episode shows the
model as the error text. `get_reward()` sums the rewards the observations carried (`reward=last`: the
last one), 0.0 when none did. `reset` passes the environment the record fields its `reset` accepts.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import typing
from collections.abc import Callable, Mapping

from llm_stages.envs import require
from llm_stages.errors import ConfigError

EXTRA = "openenv"
# Observation fields that are bookkeeping, not what the model reads.
BOOKKEEPING = ("done", "reward", "metadata")
JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}
# FastMCP's wording around a tool's own error message.
_FASTMCP_PREFIX = re.compile(r"^Error calling tool '[^']*': ")


def _openenv():
    module = require("openenv.core.env_server.mcp_environment", "openenv-core", EXTRA, "llm_stages.envs.openenv")
    logging.getLogger("fastmcp.server.server").addFilter(_drop_tool_errors)
    return module


def _drop_tool_errors(record: logging.LogRecord) -> bool:
    """FastMCP logs each tool that raised with its traceback; in training a failed call is the model's
    mistake, shown to it as the tool turn and counted (env/tool_errors), not a fault to print."""
    return not record.getMessage().startswith("Error calling tool")


class OpenEnvTools:
    """One episode's OpenEnv environment. `OpenEnvTools(env=...)` makes the environment and returns it
    wrapped in a subclass that has the environment's tools as methods: the protocol reads tools off an
    environment's class, and each tool set needs its own. Configured by this class (not a factory
    function), so the episode runner can tell before any episode that the environment owns a reward."""

    def __new__(cls, env: Callable, action: Callable | None = None, action_name: str = "act", *args, **kwargs):
        _openenv()
        environment = env()
        tools = _tool_specs(environment, action, action_name)
        subclass = _tools_class(type(environment).__name__, json.dumps(tools, sort_keys=True, default=str))
        adapter = super().__new__(subclass)
        adapter.env = environment
        return adapter

    def __init__(self, env: Callable, action: Callable | None = None, action_name: str = "act", reward: str = "sum",
                 observation_field: str | None = None):
        # self.env: the environment __new__ made from `env`
        if reward not in ("sum", "last"):
            raise ConfigError(f"rollout.environment.reward={reward!r}: sum (the episode's rewards added) or last")
        self._action, self._reward_mode, self._observation_field = action, reward, observation_field
        self._rewards: list[float] = []
        self.done = False

    def reset(self, **record) -> str | None:
        """Starts an episode: the environment's `reset` with the record fields it accepts; its observation as text."""
        self._rewards, self.done = [], False
        observation = self.env.reset(**_accepted(self.env.reset, record))
        self._note(observation)
        return self._text(observation) or None

    def get_reward(self) -> float:
        """The episode's reward: the sum (or with reward=last, the last) of the rewards observations carried."""
        if not self._rewards:
            return 0.0
        return float(self._rewards[-1] if self._reward_mode == "last" else sum(self._rewards))

    def _call(self, name: str, arguments: dict) -> str:
        if self.done:
            raise RuntimeError("the episode is over; no more tool calls")
        if self._action is None:
            from openenv.core.env_server.mcp_types import CallToolAction

            action = CallToolAction(tool_name=name, arguments=arguments)
        else:
            action = self._action(**arguments)
        observation = self.env.step(action)
        self._note(observation)
        error = getattr(observation, "error", None)
        if error is not None:
            message = getattr(error, "message", None) or str(error)
            raise RuntimeError(_FASTMCP_PREFIX.sub("", message))  # the episode names the tool already
        return self._text(observation)

    def _note(self, observation) -> None:
        if getattr(observation, "reward", None) is not None:
            self._rewards.append(float(observation.reward))
        self.done = self.done or bool(getattr(observation, "done", False))

    def _text(self, observation) -> str:
        """What the model reads of an observation: a tool's result text, `observation_field`, its one
        other field, or its other fields as JSON."""
        if observation is None:
            return ""
        if hasattr(observation, "tool_name") and hasattr(observation, "result"):
            return _result_text(observation.result)
        fields = observation.model_dump(exclude=set(BOOKKEEPING))
        if self._observation_field is not None:
            if self._observation_field not in fields:
                raise ConfigError(f"rollout.environment.observation_field={self._observation_field!r}: "
                                  f"{type(observation).__name__} has {sorted(fields)}")
            return _plain(fields[self._observation_field])
        if len(fields) == 1:
            return _plain(next(iter(fields.values())))
        return json.dumps(fields, ensure_ascii=False, default=str) if fields else ""


def _plain(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _result_text(result) -> str:
    """An MCP tool result as text: its text contents joined, else its data."""
    contents = getattr(result, "content", None)
    if contents:
        texts = [getattr(c, "text", None) for c in contents]
        if all(t is not None for t in texts):
            return "\n".join(texts)
    if getattr(result, "data", None) is not None:
        return _plain(result.data)
    return "" if result is None else _plain(result)


def _accepted(function: Callable, record: Mapping) -> dict:
    """The fields of `record` that `function` takes (all of them if it takes **kwargs)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(record)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in record.items() if k in names}


# --- tools ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tools_class(env_name: str, tools_json: str) -> type:
    """The subclass of OpenEnvTools with these tools as methods (one per tool set, named after the
    environment: the name its reward component is logged under)."""
    tools = json.loads(tools_json)
    methods = {spec["name"]: _tool_method(spec) for spec in tools}
    return type(f"OpenEnv{env_name}", (OpenEnvTools,), {**methods, "tool_specs": tools})


def _tool_specs(env, action, action_name: str) -> list[dict]:
    """[{name, description, input_schema}] of the environment's tools."""
    module = _openenv()
    if action is not None:
        action_class = getattr(action, "func", action)
        schema = action_class.model_json_schema()
        schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
        description = (inspect.getdoc(action_class) or f"Take a {action_class.__name__} in the environment.").split("\n\n")[0]
        return [{"name": action_name, "description": description, "input_schema": schema}]
    if not isinstance(env, module.MCPEnvironment):
        raise ConfigError(f"rollout.environment.env: {type(env).__name__} is an OpenEnv Environment without MCP tools; "
                          "set rollout.environment.action to its Action class ({_target_: ..., _partial_: true})")
    from openenv.core.env_server.mcp_types import ListToolsAction

    listed = env.step(ListToolsAction())
    if listed.metadata.get("error"):
        raise ConfigError(f"rollout.environment.env: {type(env).__name__} cannot list its tools: {listed.metadata['error']}")
    specs = [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in listed.tools]
    for spec in specs:
        if not spec["name"].isidentifier() or spec["name"] in ("reset", "get_reward") or spec["name"].startswith("_"):
            raise ConfigError(f"rollout.environment.env: the tool name {spec['name']!r} of {type(env).__name__} "
                              "cannot be a method name (a Python identifier, not reset, get_reward or _private)")
    return specs


def _tool_method(spec: dict) -> Callable:
    """A method named after the tool, with its parameters, types and a Google-style docstring, so the
    tool schema made from the method is the environment's own."""
    schema = spec["input_schema"] or {}
    properties, required = schema.get("properties", {}), set(schema.get("required", []))
    names = list(properties)

    def tool(self, *args, **kwargs):
        arguments = dict(zip(names, args)) | kwargs
        return self._call(spec["name"], arguments)

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations = {}
    for name, prop in properties.items():
        annotations[name] = _python_type(prop)
        default = inspect.Parameter.empty if name in required else prop.get("default")
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=annotations[name]))
    annotations["return"] = str
    tool.__name__ = tool.__qualname__ = spec["name"]
    tool.__signature__ = inspect.Signature(parameters, return_annotation=str)
    tool.__annotations__ = annotations
    tool.__doc__ = _docstring(spec["description"], properties)
    return tool


def _python_type(prop: Mapping):
    kind = prop.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        types = [JSON_TYPES[k] for k in kind if k in JSON_TYPES]
        return typing.Optional[types[0]] if len(types) == 1 and "null" in kind else typing.Any
    if kind == "array" and isinstance(prop.get("items"), Mapping) and prop["items"].get("type") in JSON_TYPES:
        return list[JSON_TYPES[prop["items"]["type"]]]
    return JSON_TYPES.get(kind, typing.Any)


def _docstring(description: str, properties: Mapping) -> str:
    lines = [(description or "A tool of the environment.").strip(), "", "Args:"]
    for name, prop in properties.items():
        text = " ".join((prop.get("description") or prop.get("title") or name).split())
        lines.append(f"    {name}: {text}")
    lines += ["", "Returns:", "    The environment's observation as text."]
    return "\n".join(lines) if properties else "\n".join(lines[:1] + lines[-3:])
