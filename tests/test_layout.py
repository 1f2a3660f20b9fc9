"""The house rules of the package layout (README, "Where things are"), checked on the source with ``ast``.

Every ``import`` and ``from ... import`` counts, the lazy ones inside functions too: a lazy import still ties two
modules together, and a circle of lazy imports is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "slugkit"
MAX_LINES = 400  # "no module longer than ~400 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """slugkit modules imported by ``name`` (``from pkg import sub`` counts as importing the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "slugkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "slugkit":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            if subs:
                out.update(subs)
            if len(subs) < len(node.names):  # names imported from the module itself
                out.add(mod)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(mod: str, *packages: str) -> bool:
    return any(mod == f"slugkit.{p}" or mod.startswith(f"slugkit.{p}.") for p in packages)


def _violations(package: str, allowed: set[str]) -> list[str]:
    """Imports from modules of ``package`` into top-level packages of ours that ``allowed`` does not name."""
    return sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if _in(m, package)
                  for d in deps if d != "slugkit" and not _in(d, package, *allowed))


BELOW_WORKFLOWS = ("common", "patch", "data", "models", "integrations", "eval", "slug", "methods", "report")
# package -> the packages of ours it may import, bottom to top; README "Where things are" states the same table.
ALLOWED = {
    "common": set(),
    "patch": {"common"},
    "data": {"common"},
    "models": {"common"},
    "integrations": {"common", "models", "patch"},
    "eval": {"common", "data", "models", "integrations", "patch"},
    "slug": {"common", "data", "models", "eval", "patch"},
    "methods": {"common", "data", "models", "eval", "patch", "slug"},
    "report": {"common"},
    "world": {"common", "data", "models", "integrations", "eval", "patch", "slug"},
    "audit": {"common", "data", "models", "integrations", "eval", "patch", "world"},
    "workflows": {*BELOW_WORKFLOWS, "world", "audit"},
    "cli": {*BELOW_WORKFLOWS, "world", "audit", "workflows"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layer_rules(package):
    assert _violations(package, ALLOWED[package]) == []


def test_patch_format_imports_nothing_of_ours():
    assert GRAPH["slugkit.patch.format"] == set()


def test_layer_rules_catch_a_violation(monkeypatch):
    """The checker itself: a made-up import of the CLI from the SLUG core is reported."""
    monkeypatch.setitem(GRAPH, "slugkit.slug.layers", GRAPH["slugkit.slug.layers"] | {"slugkit.cli"})
    assert _violations("slug", ALLOWED["slug"]) == ["slugkit.slug.layers imports slugkit.cli"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_are_small():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_every_package_is_covered_by_a_rule():
    """A new top-level package must say what it may import (add it to ALLOWED and to the README)."""
    assert {name.split(".")[1] for name, path in MODULES.items() if path.parent != PKG} == set(ALLOWED)


def test_the_program_imports_only_the_interrupt_handling_before_the_cli():
    """`slug` (slugkit/__main__.py) installs Ctrl-C handling before anything else of ours is imported."""
    assert GRAPH["slugkit.__main__"] == {"slugkit.common.interrupts", "slugkit.cli"}
    assert GRAPH["slugkit.common.interrupts"] == set()
