"""Tools a policy can call during an episode: how each is described to the model and how a call runs.

A tool is a plain function with type hints and a Google-style docstring (TRL's `tools=[fn]`); its
JSON schema, which the chat template shows the model, comes from `transformers.utils.get_json_schema`.
Arguments bound with `functools.partial` (Hydra's `_partial_: true`) and keyword-only parameters
(after `*`) are settings, not arguments: they are left out of the schema and the model cannot set them.

A call never raises: an unknown tool, arguments that do not fit the signature, an exception in the
tool, a timeout or a malformed call each come back as a `ToolResult` whose text the model reads.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from llm_stages.errors import ConfigError
from llm_stages.rollout.tool_calls import ParsedTurn, ToolCall

ERROR_KINDS = ("unknown_tool", "bad_arguments", "raised", "timeout", "parse")


class Tool(NamedTuple):
    name: str
    schema: dict  # {"type": "function", "function": {...}}, as apply_chat_template(tools=...) takes it
    fn: Callable


class ToolResult(NamedTuple):
    content: str  # what the model reads as the tool turn: the result as text, or an error message
    error: str | None  # None, or one of ERROR_KINDS


def _unwrapped(fn: Callable) -> Callable:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _bound_keywords(fn: Callable) -> set[str]:
    names = set()
    while isinstance(fn, functools.partial):
        names |= set(fn.keywords)
        fn = fn.func
    return names


def tool_from_callable(fn: Callable) -> Tool:
    """A tool from a documented function, a bound method or a `functools.partial` of either."""
    from transformers.utils import get_json_schema

    inner = _unwrapped(fn)
    label = getattr(inner, "__qualname__", repr(inner))
    try:
        function = get_json_schema(inner)["function"]
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ConfigError(
            f"tool {label}: cannot describe it to the model ({e}); give it a type hint on every argument and a "
            "Google-style docstring: a summary line, then 'Args:' with one 'name: description' line per argument"
        ) from None
    called = inspect.signature(fn).parameters
    settings = {name for name, p in inspect.signature(inner).parameters.items()
                if name not in called or name in _bound_keywords(fn) or p.kind is p.KEYWORD_ONLY}
    unset = [name for name in settings if name in called and called[name].default is inspect.Parameter.empty]
    if unset:
        raise ConfigError(f"tool {label}: keyword-only argument {unset[0]!r} has no value; bind it "
                          f"(functools.partial or a key next to `_partial_: true`) or give it a default")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    parameters["properties"] = {k: v for k, v in parameters.get("properties", {}).items() if k not in settings}
    required = [k for k in parameters.get("required", []) if k not in settings]
    parameters.pop("required", None)
    if required:
        parameters["required"] = required
    function["parameters"] = parameters
    return Tool(function["name"], {"type": "function", "function": function}, fn)


def environment_tools(environment) -> list[Tool]:
    """The tools an environment offers (TRL's `environment_factory` rule): the public methods of its
    class other than `reset` and `get_reward`, bound to this instance. Listed on the class, so
    properties are not evaluated."""
    names = [name for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
             if name not in ("reset", "get_reward") and not name.startswith("_")]
    return [tool_from_callable(getattr(environment, name)) for name in names]


def tool_table(tools: Iterable[Tool]) -> dict[str, Tool]:
    """Tools by name, as `call_tool` looks them up; two tools of one name are an error."""
    table: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in table:
            raise ConfigError(f"two tools are named {tool.name!r} ({_describe(table[tool.name].fn)} and "
                              f"{_describe(tool.fn)}); rename one: the model calls tools by name")
        table[tool.name] = tool
    return table


def _describe(fn: Callable) -> str:
    return getattr(_unwrapped(fn), "__qualname__", repr(fn))


PARSE_ERROR = "tool_call_error"  # the tool turn's name for a call that could not be parsed


def assistant_message(parsed: ParsedTurn) -> dict:
    """A parsed assistant turn as chat templates take it: its text, and its calls as `tool_calls`."""
    message = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.calls]
    return message


def run_calls(tools: Mapping[str, Tool], parsed: ParsedTurn, *, timeout: float | None) -> list[tuple[str, ToolResult]]:
    """(name, result) of each call of a turn, in order, then one per call that could not be parsed:
    what the tool turns that answer it hold."""
    results = [(call.name, call_tool(tools, call, timeout=timeout)) for call in parsed.calls]
    return results + [(PARSE_ERROR, parse_failure_result(failure)) for failure in parsed.failures]


def parse_failure_result(message: str) -> ToolResult:
    """The tool turn for a call the parser could not read (the message names what was wrong)."""
    return ToolResult(message, "parse")


def call_tool(tools: Mapping[str, Tool], call: ToolCall, *, timeout: float | None) -> ToolResult:
    """Run one call. Its arguments are checked against the tool's schema and signature before it
    runs; whatever goes wrong comes back as text for the model, never as an exception."""
    tool = tools.get(call.name)
    if tool is None:
        names = ", ".join(sorted(tools)) or "none"
        return ToolResult(f"error: there is no tool named {call.name!r}; the tools are: {names}", "unknown_tool")
    allowed = tool.schema["function"]["parameters"].get("properties", {})
    unexpected = [name for name in call.arguments if name not in allowed]
    try:
        if unexpected:
            raise TypeError(f"unexpected argument {unexpected[0]!r}")
        inspect.signature(tool.fn).bind(**call.arguments)
    except TypeError as e:
        return ToolResult(f"error: bad arguments for {tool.name}: {e}; it takes {_signature(tool)}", "bad_arguments")
    if timeout is None:
        outcome = _run(tool.fn, call.arguments)
    else:
        outcome = _run_with_timeout(tool.fn, call.arguments, timeout)
        if outcome is None:
            return ToolResult(f"error: {tool.name} did not finish within {timeout:g} s", "timeout")
    value, raised = outcome
    if raised is not None:
        return ToolResult(f"error: {tool.name} raised {type(raised).__name__}: {raised}", "raised")
    return ToolResult(_as_text(value), None)


def _signature(tool: Tool) -> str:
    properties = tool.schema["function"]["parameters"].get("properties", {})
    required = set(tool.schema["function"]["parameters"].get("required", []))
    listed = [f"{name}: {spec.get('type', 'any')}" + ("" if name in required else " (optional)")
              for name, spec in properties.items()]
    return f"{tool.name}({', '.join(listed)})"


def _run(fn: Callable, arguments: dict) -> tuple[object, BaseException | None]:
    try:
        value = fn(**arguments)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
        return value, None
    except (Exception, SystemExit) as e:  # a tool calling sys.exit() must not end the training run
        return None, e


async def _awaited(awaitable):
    return await awaitable


def _run_with_timeout(fn: Callable, arguments: dict, timeout: float):
    """`_run` in a worker thread, or None past `timeout`. A thread, not a process, because tools are
    often methods of a live environment whose state must change in place. Python cannot stop a
    thread: a late call runs on in the background (a daemon thread, so it does not hold up exit)
    and its result is dropped. A tool that can hang for good should bound itself, as `run_python`
    does with its own process."""
    box: list = []
    worker = threading.Thread(target=lambda: box.append(_run(fn, arguments)), daemon=True, name="tool-call")
    worker.start()
    worker.join(timeout)
    return box[0] if box else None


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)
