"""The package's shape: no import circle, the benchmark a leaf, modules of a readable size.

Every ``import`` and ``from`` statement is read with ``ast``, at any depth: the
ones inside functions (imported late, for speed or optional extras) and under
``TYPE_CHECKING`` count too, since a circle hidden by a late import is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "deployments"
BENCH = "deployments.bench"
MAX_LINES = 400
# The words a module's docstring uses to say why it is longer.
LONG_REASON = f"over {MAX_LINES} lines because"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PRODUCT = sorted(m for m in MODULES if m != BENCH and not m.startswith(BENCH + "."))
# Scripts beside the package that ship with the repository and must not lean on
# the benchmark either.
TOOLS = sorted((ROOT / "config").glob("*.py"))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imported(path: Path, module: str | None) -> set[str]:
    """The modules of ``deployments`` (or of anything, for a script) that ``path``
    imports anywhere in it, relative imports resolved against ``module``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                assert module is not None, f"{path}: a relative import outside the package"
                here = module.split(".") if _is_package(module) else module.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from deployments import cli` imports the module deployments.cli.
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (itself left out)."""
    return {
        name: {m for m in imported(path, name) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (or a module that
    imports itself), each sorted: Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1 or node in edges.get(node, ()):
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_hidden_circle() -> None:
    # The shape the package once had: cli -> bulk -> cli, and a longer one.
    edges = {"cli": {"bulk", "bench"}, "bulk": {"cli"}, "bench": {"b2"}, "b2": {"cli"}, "x": set()}
    assert cycles(edges) == [["b2", "bench", "bulk", "cli"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_lazy_and_relative_imports_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from deployments.cli import main\n    import deployments.bulk\n"
        "from . import files\nfrom .bench import harness\n"
    )
    found = imported(source, "deployments.cli")
    assert {"deployments.cli", "deployments.bulk", "deployments.files"} <= found
    assert "deployments.bench.harness" in found


def test_no_import_circle() -> None:
    edges = graph()
    assert "deployments.bulk" in edges["deployments.cli"], "the walker lost a late import"
    assert cycles(edges) == []


@pytest.mark.parametrize("module", PRODUCT)
def test_product_never_imports_the_benchmark(module: str) -> None:
    reached = {m for m in imported(MODULES[module], module) if m.startswith(BENCH)}
    assert not reached, f"{module} imports {sorted(reached)}: the benchmark is a leaf"


@pytest.mark.parametrize("script", TOOLS, ids=lambda p: p.name)
def test_config_scripts_never_import_the_benchmark(script: Path) -> None:
    reached = {m for m in imported(script, None) if m.startswith(BENCH)}
    assert not reached, f"{script.name} imports {sorted(reached)}"


@pytest.mark.parametrize("module", PRODUCT)
def test_product_modules_are_short_or_say_why(module: str) -> None:
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    # The reason stands in the docstring's first paragraph, where a reader looks.
    head = " ".join(docstring.split("\n\n")[0].split())
    assert lines <= MAX_LINES or LONG_REASON in head, (
        f"{module} has {lines} lines; split it, or say in its docstring's first "
        f"paragraph why it is {LONG_REASON} ..."
    )


def test_ci_runs_every_slow_suite() -> None:
    """Each file of the slow tier is named by a `slow` line of .ci/run: a new suite
    cannot be left out of CI by forgetting it there."""
    run = (ROOT / ".ci" / "run").read_text()
    named = {
        word
        for line in run.splitlines()
        if line.startswith("slow ")
        for word in line.split()
        if word.startswith("tests/slow/")
    }
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "slow").glob("test_*.py")}
    assert files == named
