"""Two tools that ship: `calculator` (arithmetic, never `eval`) and `run_python` (code in a separate,
resource-limited process). Configure either as `{_target_: llm_stages.rollout.builtin_tools.<name>,
_partial_: true}`; `run_python`'s limits are keys next to `_partial_` (`cpu_seconds: 2`).

`run_python` limits resources (CPU time, memory, file size, wall clock) with Linux rlimits; it is
not a security sandbox: the code can read what this user can read and reach the network. Run
untrusted code inside a container.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION = 1000  # characters
OUTPUT_BYTES = 4 * 2 ** 20  # the most a program may write to one file, its output included
MAX_BITS = 4096  # the largest integer a calculation may reach (about 1233 digits)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, for example "(2 + 3) * 4 ** 2".

    Returns:
        The value: an integer when the result is whole, else a decimal number.
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is too large")
        if value.is_integer() and abs(value) < 2 ** 53:
            return str(int(value))
        return repr(value)
    return str(value)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise ValueError("the result is too large")
        return value
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


def _check_power(base, exponent) -> None:
    """Refuses a power whose integer result would pass MAX_BITS before computing it (`9**9**9` would
    run for hours)."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1 \
            and (abs(base).bit_length() - 1) * exponent > MAX_BITS:
        raise ValueError(f"the result is too large (exponent {exponent} on {base})")


# The child sets its own limits, then becomes the user's program (rlimits survive exec). Setting
# them there rather than in `preexec_fn` keeps this safe to call from the threads `call_tool` uses.
_LAUNCHER = """\
import os, resource, sys
cpu, memory, file_size = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.executable, [sys.executable, "-I", "main.py"])
"""


def run_python(code: str, *, cpu_seconds: int = 5, memory_mb: int = 512, wall_seconds: float = 10,
               max_chars: int = 2000) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: The complete program; print what you want to see.
        cpu_seconds: CPU time limit of the process.
        memory_mb: Address-space limit of the process, in MB.
        wall_seconds: Wall-clock limit, in seconds.
        max_chars: The most characters of output returned.

    Returns:
        Its standard output, the end of its standard error, and which limit stopped it, if one did.
    """
    with tempfile.TemporaryDirectory(prefix="run_python-") as folder:
        folder = Path(folder)
        (folder / "main.py").write_text(code)
        environment = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": str(folder), "TMPDIR": str(folder)}
        cpu_seconds = max(1, math.ceil(cpu_seconds))  # RLIMIT_CPU counts whole seconds
        limits = [str(cpu_seconds), str(memory_mb * 2 ** 20), str(OUTPUT_BYTES)]
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            # Output goes to files (capped by RLIMIT_FSIZE), not pipes, so a print loop cannot fill our memory.
            process = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, *limits], cwd=folder, env=environment,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                status, stopped = process.wait(timeout=wall_seconds), None
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the whole session: children the program started too
                status, stopped = process.wait(), f"killed: wall-clock limit of {wall_seconds:g} s"
        stdout = (folder / "stdout").read_text(errors="replace")
        stderr = (folder / "stderr").read_text(errors="replace").replace(f"{folder}/", "")
    if stopped is None and status in (-signal.SIGXCPU, -signal.SIGKILL):
        stopped = f"killed: CPU time limit of {cpu_seconds:g} s"
    elif stopped is None and stderr.rstrip().rpartition("\n")[2].startswith("MemoryError"):
        stopped = f"killed: memory limit of {memory_mb} MB"
    elif stopped is None and "OSError: [Errno 27] File too large" in stderr:
        stopped = f"killed: output limit of {OUTPUT_BYTES // 2 ** 20} MB"
    elif stopped is None and status:
        stopped = f"exit status {status}"
    return _report(stdout, stderr, stopped, max_chars)


def _report(stdout: str, stderr: str, stopped: str | None, max_chars: int) -> str:
    """stdout (its beginning when long), then the end of stderr (where a traceback's message is),
    then how the program stopped; within about max_chars."""
    stderr_share = max_chars // 2 if stdout else max_chars
    if len(stderr) > stderr_share:
        stderr = f"[... {len(stderr) - stderr_share} characters]\n" + stderr[-stderr_share:]
    room = max(0, max_chars - len(stderr))
    if len(stdout) > room:
        stdout = stdout[:room] + f"\n[... {len(stdout) - room} more characters]\n"
    parts = [part.rstrip("\n") for part in (stdout, stderr, stopped) if part and part.strip()]
    return "\n".join(parts) if parts else "(no output)"
