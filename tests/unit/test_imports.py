"""The package's import graph: no cycles, every module importable on its own, and the core
(`llm_stages`) never importing the `callbacks` package (callbacks depend on the core, not back).

The graph is read from the source (every `import`, also those inside functions, which is how a
cycle usually hides: a lazy import that only breaks when the modules load in another order).
Importing each module "on its own" runs in one fresh interpreter: third-party packages (torch,
transformers, lightning) stay loaded, and before each module every `llm_stages`/`callbacks` module is
dropped from `sys.modules`, so the module is the first of ours to load, as it would be in a fresh
process, at a fraction of the cost of one process per module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("llm_stages", "callbacks")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "conf" in parts or "__pycache__" in parts:
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules `name` imports anywhere in its body (outside `if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_lazy_imports_are_edges(tmp_path):
    (tmp_path / "mod.py").write_text("def f():\n    from .other import thing\n")
    modules = {"pkg.mod": tmp_path / "mod.py", "pkg.other": tmp_path / "other.py"}
    assert _imports("pkg.mod", tmp_path / "mod.py", modules) == {"pkg.other"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_never_imports_callbacks():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "callbacks")
                 for name, targets in import_graph().items() if name.split(".")[0] == "llm_stages"}
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert not offenders, f"the core imports callbacks: {offenders}"


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    names = sorted(name for name in _modules() if not name.endswith("__main__"))
    script = f"""
import importlib, sys, traceback
import torch, transformers, lightning, datasets, hydra, omegaconf, peft  # third-party: loaded once
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


# The layers, lowest first (docs/architecture.md): a module imports only from its own layer or below.
LAYERS = [
    ("ground", ["llm_stages", "llm_stages.errors", "llm_stages.checks", "llm_stages.ranges", "llm_stages.models",
                "llm_stages.lean_layers", "llm_stages.adapters", "llm_stages.losses"]),
    ("training", ["llm_stages.training", "llm_stages.config"]),
    ("data", ["llm_stages.data", "llm_stages.data.word_problems", "callbacks"]),
    ("rollout", ["llm_stages.rollout",
                 "llm_stages.rollout.tool_calls", "llm_stages.rollout.tools", "llm_stages.rollout.builtin_tools",
                 "llm_stages.envs"]),
    ("stages", ["llm_stages.stages"]),
    ("evaluate", ["llm_stages.evaluate"]),
    ("entry points", ["llm_stages.train", "llm_stages.pipeline", "llm_stages.chat", "llm_stages.__main__",
                      "llm_stages.assets"]),  # assets: the script that builds the shipped tokenizer
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`'s package or module."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
                  for name, targets in graph.items() for target in targets if layer_of(target) > layer_of(name))


def test_layer_order_finds_an_upward_import():
    assert upward_imports({"llm_stages.models": {"llm_stages.stages.dpo"}, "llm_stages.stages.dpo": set()}) == [
        "llm_stages.models (ground) -> llm_stages.stages.dpo (stages)"]


def test_no_import_runs_up_the_layers():
    upward = upward_imports(import_graph())
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "llm_stages").glob("*.py"))
    assert len(top) <= 14, f"{len(top)} top-level modules in llm_stages/: {top}; put new ones in a subpackage by layer"
