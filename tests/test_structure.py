"""The package's shape: stages without import cycles, short modules, small public surfaces, and an
`import glmdeploy` that costs no torch."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glmdeploy"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every glmdeploy module `path` imports, wherever the import stands (functions and
    TYPE_CHECKING blocks included): `from pkg import sub` counts `pkg.sub` when it is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("glmdeploy")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("glmdeploy"):
            module = str(node.module)
            subs = {f"{module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs or {module}
            if len(subs) < len(node.names):
                found.add(module)
    return found & MODULES.keys()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` meets (module -> modules it imports)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    # Package __init__ modules import their exports under TYPE_CHECKING, so lazy re-exports count.
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    cycles = _cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from glmdeploy.cli.commands import cmd_show\n")
    assert _imports(tmp_path / "a.py") == {"glmdeploy.cli.commands"}  # function-level imports too
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_longer_than_400_lines(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by what it does"


PACKAGES = sorted(n for n, p in MODULES.items() if p.name == "__init__.py")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_package_lists_its_public_names(name: str) -> None:
    package = importlib.import_module(name)
    public = getattr(package, "__all__", None)
    assert public, f"{name}/__init__.py has no __all__"
    for attribute in public:
        assert getattr(package, attribute) is not None, f"{name}.{attribute} does not resolve"


def test_importing_glmdeploy_and_naming_its_api_imports_no_torch() -> None:
    code = (
        "import glmdeploy, sys; glmdeploy.plan; glmdeploy.load; glmdeploy.compose; "
        "print(sorted(m for m in ('torch', 'transformers', 'hydra', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_api_names_are_the_functions_not_subpackages() -> None:
    import glmdeploy
    from glmdeploy import api

    for name in ("compose", "validate", "plan", "load", "generate", "bench"):
        assert getattr(glmdeploy, name) is getattr(api, name)
