"""Tools: schemas from docstrings (plain functions, partials, environment methods), calls that come
back as text for every kind of failure, and the two built-in tools with their limits."""

import asyncio
import functools
import time

import pytest

from llm_stages.errors import ConfigError
from llm_stages.rollout.builtin_tools import calculator, run_python
from llm_stages.rollout.tool_calls import ToolCall
from llm_stages.rollout.tools import (ToolResult, call_tool, environment_tools, parse_failure_result,
                                      tool_from_callable, tool_table)


def scale(values: list[float], factor: float, offset: int = 0) -> list[float]:
    """Scale numbers.

    Args:
        values: The numbers to scale.
        factor: What to multiply each by.
        offset: What to add afterwards.
    """
    return [v * factor + offset for v in values]


def fail(reason: str) -> str:
    """Always fails.

    Args:
        reason: Why.
    """
    raise KeyError(reason)


def leave(code: int) -> str:
    """Exits.

    Args:
        code: The exit status.
    """
    raise SystemExit(code)


def nap(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


class Counter:
    """An environment: its public methods are the tools."""

    def reset(self, start: int = 0, **_) -> str:
        self.count = start
        return "ready"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: How much to add.
        """
        self.count += by
        return self.count

    def get_reward(self) -> float:
        return float(self.count)

    def _secret(self) -> None:
        pass

    @property
    def broken(self):
        raise AssertionError("properties are not evaluated")


def test_schema_of_a_documented_function():
    tool = tool_from_callable(scale)
    assert tool.name == "scale" and tool.fn is scale
    assert tool.schema == {"type": "function", "function": {
        "name": "scale", "description": "Scale numbers.",
        "parameters": {"type": "object", "properties": {
            "values": {"type": "array", "items": {"type": "number"}, "description": "The numbers to scale."},
            "factor": {"type": "number", "description": "What to multiply each by."},
            "offset": {"type": "integer", "description": "What to add afterwards."}},
            "required": ["values", "factor"]},
        "return": {"type": "array", "items": {"type": "number"}}}}


def test_a_partial_keeps_the_name_and_drops_what_it_binds():
    tool = tool_from_callable(functools.partial(scale, [1.0, 2.0], offset=1))
    assert tool.name == "scale"
    assert tool.schema["function"]["parameters"] == {"type": "object", "properties": {
        "factor": {"type": "number", "description": "What to multiply each by."}}, "required": ["factor"]}
    assert call_tool(tool_table([tool]), ToolCall("scale", {"factor": 2}), timeout=None) == \
        ToolResult("[3.0, 5.0]", None)
    # the model cannot set what the configuration bound
    assert call_tool(tool_table([tool]), ToolCall("scale", {"factor": 2, "offset": 9}), timeout=None) == ToolResult(
        "error: bad arguments for scale: unexpected argument 'offset'; it takes scale(factor: number)", "bad_arguments")


def test_keyword_only_arguments_are_settings_the_model_cannot_see():
    tool = tool_from_callable(run_python)
    assert list(tool.schema["function"]["parameters"]["properties"]) == ["code"]
    assert tool.schema["function"]["parameters"]["required"] == ["code"]


def test_an_undocumented_function_is_a_config_error_naming_it():
    def helper(x: int) -> int:
        return x

    with pytest.raises(ConfigError) as error:
        tool_from_callable(helper)
    assert str(error.value) == (
        "tool test_an_undocumented_function_is_a_config_error_naming_it.<locals>.helper: cannot describe it to the "
        "model (Cannot generate JSON schema for helper because it has no docstring!); give it a type hint on every "
        "argument and a Google-style docstring: a summary line, then 'Args:' with one 'name: description' line per "
        "argument")


def test_environment_tools_are_its_public_methods_bound_to_it():
    env = Counter()
    env.reset(start=5)
    tools = environment_tools(env)
    assert [t.name for t in tools] == ["increment"]
    assert tools[0].schema["function"]["parameters"]["properties"] == {
        "by": {"type": "integer", "description": "How much to add."}}
    assert call_tool(tool_table(tools), ToolCall("increment", {"by": 2}), timeout=1.0) == ToolResult("7", None)
    assert env.count == 7  # the call ran on this instance, in place


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(ConfigError, match=r"^two tools are named 'scale' \(scale and scale\); rename one"):
        tool_table([tool_from_callable(scale), tool_from_callable(functools.partial(scale, offset=2))])


TOOLS = tool_table([tool_from_callable(f) for f in (scale, fail, leave, nap, calculator)])


@pytest.mark.parametrize("call, result", [
    (ToolCall("scale", {"values": [1, 2], "factor": 0.5}), ToolResult("[0.5, 1.0]", None)),
    (ToolCall("calculator", {"expression": "123*456"}), ToolResult("56088", None)),
    (ToolCall("search", {"q": "x"}),
     ToolResult("error: there is no tool named 'search'; the tools are: calculator, fail, leave, nap, scale",
                "unknown_tool")),
    (ToolCall("scale", {"values": [1]}), ToolResult(
        "error: bad arguments for scale: missing a required argument: 'factor'; it takes "
        "scale(values: array, factor: number, offset: integer (optional))", "bad_arguments")),
    (ToolCall("calculator", {"expr": "1"}), ToolResult(
        "error: bad arguments for calculator: unexpected argument 'expr'; it takes calculator(expression: string)",
        "bad_arguments")),
    (ToolCall("fail", {"reason": "no such key"}), ToolResult("error: fail raised KeyError: 'no such key'", "raised")),
    (ToolCall("leave", {"code": 3}), ToolResult("error: leave raised SystemExit: 3", "raised")),
    (ToolCall("calculator", {"expression": "1/0"}),
     ToolResult("error: calculator raised ValueError: division by zero", "raised")),
])
def test_call_tool(call, result):
    assert call_tool(TOOLS, call, timeout=None) == result
    assert call_tool(TOOLS, call, timeout=5.0) == result


def test_a_slow_tool_times_out_and_its_late_result_is_dropped():
    start = time.monotonic()
    assert call_tool(TOOLS, ToolCall("nap", {"seconds": 0.5}), timeout=0.1) == ToolResult(
        "error: nap did not finish within 0.1 s", "timeout")
    assert time.monotonic() - start < 0.4
    assert call_tool(TOOLS, ToolCall("nap", {"seconds": 0.0}), timeout=1.0) == ToolResult("awake", None)


def test_results_that_are_not_text():
    def anything(kind: str):
        """Returns something.

        Args:
            kind: What.
        """
        return {"json": {"a": [1, 2.5, None], "é": True}, "object": {1, 2}.__class__}[kind]

    tools = tool_table([tool_from_callable(anything)])
    assert call_tool(tools, ToolCall("anything", {"kind": "json"}), timeout=None).content == \
        '{"a": [1, 2.5, null], "é": true}'
    assert call_tool(tools, ToolCall("anything", {"kind": "object"}), timeout=None).content == "<class 'set'>"


def test_an_async_tool_is_awaited():
    async def later(x: int) -> int:
        """Later.

        Args:
            x: A number.
        """
        await asyncio.sleep(0)
        return x + 1

    tools = tool_table([tool_from_callable(later)])
    assert call_tool(tools, ToolCall("later", {"x": 1}), timeout=1.0) == ToolResult("2", None)


def test_parse_failure_result():
    message = 'error: tool call 1: no "name" string; expected ...'
    assert parse_failure_result(message) == ToolResult(message, "parse")


@pytest.mark.parametrize("expression, value", [
    ("123*456", "56088"), ("7/2", "3.5"), ("8/2", "4"), ("7//2", "3"), ("-7 % 3", "2"), ("2**10", "1024"),
    ("-(2 + 3) * 4", "-20"), ("2**-2", "0.25"), ("1.5e3 + 1", "1501"), ("0.1 + 0.2", "0.30000000000000004"),
    (" +3 ", "3"),
])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("x + 1", "only numbers, + - * / // % ** and parentheses are allowed, not 'x'"),
    ("2 ^ 3", "only numbers, + - * / // % ** and parentheses are allowed, not '2 ^ 3'"),
    ("__import__('os')", "only numbers, + - * / // % ** and parentheses are allowed, not \"__import__('os')\""),
    ("1 +", "not an arithmetic expression: '1 +'"),
    ("9**9**9", "the result is too large (exponent 387420489 on 9)"),
    ("2**5000", "the result is too large (exponent 5000 on 2)"),
    ("1e308 * 10", "the result is too large"),
    ("(-8) ** 0.5", "the result is not a real number"),
    ("1" * 1001, "expression longer than 1000 characters"),
])
def test_calculator_errors(expression, message):
    start = time.monotonic()
    with pytest.raises(ValueError) as error:
        calculator(expression)
    assert str(error.value) == message
    assert time.monotonic() - start < 0.5


def test_run_python_returns_what_it_prints():
    assert run_python("print(6 * 7)\nimport sys; print('note', file=sys.stderr)") == "42\nnote"
    assert run_python("x = 1") == "(no output)"
    assert run_python("print('a' * 50)", max_chars=20) == "a" * 20 + "\n[... 31 more characters]"


def test_run_python_error_and_environment():
    out = run_python("import os\nprint(sorted(os.environ))\n1/0")
    assert out.startswith("['HOME', 'LANG', 'PATH', 'TMPDIR']\nTraceback (most recent call last):\n"
                          '  File "main.py", line 3, in <module>')
    assert out.endswith("ZeroDivisionError: division by zero\nexit status 1")


def test_run_python_memory_and_wall_clock_limits():
    out = run_python("x = bytearray(400 * 2**20)", memory_mb=128)
    assert out.endswith("MemoryError\nkilled: memory limit of 128 MB")
    start = time.monotonic()
    assert run_python("import time\nprint('started', flush=True)\ntime.sleep(30)", wall_seconds=0.3) == \
        "started\nkilled: wall-clock limit of 0.3 s"
    assert time.monotonic() - start < 2


@pytest.mark.slow
def test_run_python_cpu_limit():
    assert run_python("while True: pass", cpu_seconds=1) == "killed: CPU time limit of 1 s"
    assert run_python("while True: print('spam' * 100)").endswith("killed: output limit of 4 MB")
