"""No import cycles anywhere in plm_engine: dependencies point one way (cli/server -> generation|training ->
models -> layers -> ops -> backends, and inside an op family: public op -> contract <- backends).

The graph is read from the source with ast, so it sees every import, also those inside functions (a
function-level import that closes a cycle is still a cycle: it only hides it until the call). Imports
under `if TYPE_CHECKING:` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.utils import REPO_ROOT


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module, line) for every import statement that can run, absolute names."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno, tuple(a.name for a in node.names)


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: first line} for every module under package_dir.

    `from pkg import name` is an edge to the submodule pkg.name when there is one, else to pkg itself.
    Importing a submodule is not counted as importing its parent package's __init__ (Python runs it, but
    a package that imports its own submodules is not a cycle).
    """
    root = package_dir.parent
    files = {_module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name, {})
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, line, names in _imports(tree, name, path.name == "__init__.py"):
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(target)
            for t in targets:
                if t in files and t != name:
                    edges.setdefault(t, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph, comp) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b} (line {line})" for a in comp for b, line in graph[a].items() if b in members]
    return "\n".join([" <-> ".join(comp), *edges])


def test_plm_engine_has_no_import_cycles():
    graph = import_graph(REPO_ROOT / "plm_engine")
    assert len(graph) > 50 and "plm_engine.ops.norms" in graph["plm_engine.ops"]  # the walker sees the package
    found = cycles(graph)
    assert not found, "import cycles in plm_engine:\n" + "\n".join(_describe(graph, c) for c in found)


def test_op_families_import_their_contract_not_each_other():
    """Inside an op family the public op and every backend import the family's contract
    (plm_engine/ops/contracts/<family>.py); no backend imports a public op module, and a contract
    imports nothing of the ops layer."""
    graph = import_graph(REPO_ROOT / "plm_engine")
    contracts = sorted(m.rpartition(".")[2] for m in graph if m.startswith("plm_engine.ops.contracts."))
    assert len(contracts) >= 8, contracts
    for family in contracts:
        contract = f"plm_engine.ops.contracts.{family}"
        public = "plm_engine.ops.attention" if family == "paged_attention" else f"plm_engine.ops.{family}"
        assert contract in graph[public], f"{public} does not import {contract}"
        backend = f"plm_engine.ops.triton.{family}"
        if backend in graph:
            assert contract in graph[backend], f"{backend} does not import {contract}"
        assert all(e.startswith("plm_engine.ops.contracts") for e in graph[contract]), (contract, graph[contract])
    shared = {"plm_engine.ops.backends", "plm_engine.ops.checks", "plm_engine.ops.extension"}
    for mod, edges in graph.items():
        if mod.startswith("plm_engine.ops.triton."):
            bad = sorted(
                e
                for e in edges
                if e not in shared and not e.startswith(("plm_engine.ops.contracts", "plm_engine.ops.triton"))
            )
            assert not bad, f"{mod} imports {bad}: a backend imports its family's contract, not the public op"


def test_walker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import a\n")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n\ndef f():\n    from ..c import g\n"
    )
    (pkg / "c.py").write_text("import pkg.sub.a\ndef g(): pass\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c": 6}
    assert cycles(graph) == [["pkg.c", "pkg.sub.a", "pkg.sub.b"]]
    (pkg / "c.py").write_text("def g(): pass\n")
    assert cycles(import_graph(pkg)) == []
