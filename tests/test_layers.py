"""The layout of dpdm-core and the CLI, checked from the source: each module imports only its own layer and the
layers below it (imports inside functions count too), no import cycle between modules, no module longer than 400
lines. The layers, bottom up, are ARCHITECTURE.md's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "packages"
CORE = ROOT / "dpdm-core" / "src" / "dpdm" / "core"
CLI = ROOT / "dpdm-cli" / "src" / "dpdm" / "cli"
# bottom up; the top-level modules of dpdm.core are the contracts (plus errors, progress, utils) on the ground floor
LAYERS = ["", "plugins", "config", "io", "train", "eval", "pipeline"]
FACADES = {"dpdm.core", "dpdm.core._moved"}  # the lazy facade re-exports names from every layer
MAX_LINES = 400


def _module_name(path: Path, package: str, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules(base: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, package, base): p for p in sorted(base.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of the dpdm modules ``name`` imports (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dpdm."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("dpdm."):
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from . import x` imports a module x
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def _layer(name: str) -> int:
    first = name.removeprefix("dpdm.core").lstrip(".").split(".")[0]
    return LAYERS.index(first) if first in LAYERS[1:] else 0


def test_core_modules_import_only_their_layer_and_below():
    graph = _graph(_modules(CORE, "dpdm.core"))
    upward = sorted(f"{name} -> {dep}" for name, deps in graph.items() if name not in FACADES
                    for dep in deps if dep not in FACADES and _layer(dep) > _layer(name))
    assert upward == []


def test_core_imports_no_other_distribution_below_the_pipeline():
    """dpdm-core stands alone (CI installs it without the others): only the pipeline may use dpdm-data's loader."""
    modules = _modules(CORE, "dpdm.core")
    outside = sorted(f"{name} -> {dep}" for name, path in modules.items() for dep in _imports(name, path)
                     if dep.startswith("dpdm.") and not dep.startswith("dpdm.core") and _layer(name) < LAYERS.index("pipeline"))
    assert outside == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("base, package", [(CORE, "dpdm.core"), (CLI, "dpdm.cli")], ids=["core", "cli"])
def test_no_import_cycles(base, package):
    modules = _modules(base, package)
    graph = _graph(modules)
    # a package's __init__ is imported with each of its modules; it is not a cycle when a module imports a sibling
    graph = {n: {d for d in deps if not (modules[d].name == "__init__.py" and n.startswith(d + "."))}
             for n, deps in graph.items()}
    graph = {n: deps - FACADES for n, deps in graph.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("base", [CORE, CLI], ids=["core", "cli"])
def test_no_module_over_400_lines(base):
    long = {str(p.relative_to(ROOT)): n for p in base.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_ground_floor_is_the_contracts():
    """What a newcomer guesses at the top of dpdm.core (STYLE habit 13): the contracts, and nothing of the wings."""
    top = sorted(p.stem for p in CORE.glob("*.py") if not p.stem.startswith("_"))
    assert top == ["datasets", "defaults", "divergences", "errors", "losses", "precond", "progress", "samplers", "schedules",
                   "sigmas", "utils"]
    assert sorted(p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS[1:])


def test_every_import_the_docs_show_works_without_a_deprecation_warning():
    """The names README.md, ARCHITECTURE.md and docs/ import from dpdm keep working, at their current homes."""
    import importlib
    import re
    import warnings

    docs = [ROOT.parent / "README.md", ROOT.parent / "ARCHITECTURE.md", *sorted((ROOT.parent / "docs").glob("*.md"))]
    lines = {m.group(0).strip() for doc in docs
             for m in re.finditer(r"^\s*from (dpdm\.[\w.]+) import ([\w, ]+)$", doc.read_text(), re.M)}
    assert lines  # the README shows some
    for line in sorted(lines):
        module, names = re.match(r"from (\S+) import (.+)", line).groups()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            imported = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert getattr(imported, name, None) is not None, line


@pytest.mark.parametrize("old, new", [("checkpoint", "io.checkpoint"), ("run", "pipeline.run"),
                                      ("registry", "plugins.registry"), ("engine", "train.engine")])
def test_the_0_1_module_paths_still_import_with_a_deprecation_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(f"dpdm.core.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"dpdm\.core\.{old} moved to dpdm\.core\.{new}"):
        module = importlib.import_module(f"dpdm.core.{old}")
    assert module is importlib.import_module(f"dpdm.core.{new}")
    assert module.__name__ == f"dpdm.core.{new}"
