"""The package's shape (DESIGN.md, Layout): imports point one way, modules stay small, and what one module
uses of another is public there.

Imports are read from the source (ast), including imports inside functions: a cycle hidden in a function
body is still a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "attnfuse"
MAX_LINES = 420  # the house style's "aim <= 400", with a little room for a docstring


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, modules=MODULES) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every attnfuse import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "attnfuse" or module.startswith("attnfuse."):
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.append((sub, None) if sub in modules else (module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("attnfuse")]
    return found


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name, path in MODULES.items():
        for module, _ in _imports(name, path):
            if module in MODULES and module != name and not name.startswith(module + "."):
                graph.add_edge(name, module)  # a package's own __init__ runs first: not an edge back
    return graph


def test_no_import_cycles():
    cycles = sorted(nx.simple_cycles(_graph()), key=len)
    assert not cycles, f"import cycles inside attnfuse (function-level imports count): {cycles[:5]}"


def _reaches(graph: nx.DiGraph, source: str, prefix: str) -> list[str]:
    return sorted(m for m in nx.descendants(graph, source) if m == prefix or m.startswith(prefix + "."))


def test_dependencies_point_one_way():
    graph = _graph()
    tiles = "attnfuse.costmodel.tiles"
    assert set(graph.successors(tiles)) <= {"attnfuse.device"}, "the tile model is a leaf over attnfuse.device"
    assert not _reaches(graph, "attnfuse.costmodel.plan", "attnfuse.kernels"), "the planner imports a launcher"
    for name in MODULES:
        if name.startswith("attnfuse.kernels"):
            assert "attnfuse.costmodel.plan" not in nx.descendants(graph, name), f"{name} imports the planner"
            assert not _reaches(graph, name, "attnfuse.passes"), f"{name} imports a pass"
        if name.startswith("attnfuse.parallel"):  # below the passes: the rewritten graphs call it
            for upper in ("attnfuse.passes", "attnfuse.backend", "attnfuse.config"):
                assert not _reaches(graph, name, upper), f"{name} imports {upper}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (house style: aim <= 400)"


def test_no_private_names_across_modules():
    private = [(name, module, imported) for name, path in MODULES.items()
               for module, imported in _imports(name, path)
               if imported and imported.startswith("_") and module != name]
    assert not private, f"private names imported from other modules (make them public there): {private}"


def test_the_checks_see_what_they_check(tmp_path):
    """A function-level import of a private name that closes a cycle is found as both."""
    (tmp_path / "fake_a.py").write_text("def f():\n    from .fake_b import _x\n    return _x\n")
    (tmp_path / "fake_b.py").write_text("from . import fake_a\n_x = 1\n")
    fake = {"attnfuse.fake_a": tmp_path / "fake_a.py", "attnfuse.fake_b": tmp_path / "fake_b.py"}
    found = {name: _imports(name, path, fake) for name, path in fake.items()}
    assert found == {"attnfuse.fake_a": [("attnfuse.fake_b", "_x")], "attnfuse.fake_b": [("attnfuse.fake_a", None)]}
    graph = nx.DiGraph([(n, m) for n, imps in found.items() for m, _ in imps])
    assert len(list(nx.simple_cycles(graph))) == 1
