"""Dependencies point one way: no import cycle inside ``pretrain/`` or ``transfer/``, and ``pretrain`` never
imports ``transfer``.

Every import statement counts, at module level or inside a function (a function-level import is still a
dependency, only a later one), except those under ``if TYPE_CHECKING:``. Importing ``a.b.c`` from outside ``a.b`` also runs the
packages ``a`` and ``a.b``, so the importer depends on them too (a module inside ``a.b`` runs as part of
its package, which is what lets a package's ``__init__`` import its own modules).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "transfer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    todo: List[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _with_parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def import_graph() -> Dict[str, Set[str]]:
    """``{module: modules of pretrain/transfer it imports}`` for every .py file of the two packages."""
    files = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: Set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package of this module
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # `from a import b`: the module a.b when there is one, else a name defined in a
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            own = set(_with_parents(name))  # this module's own packages are running already
            for target in targets:
                deps.update(m for m in _with_parents(target) if m in files and (m == target or m not in own))
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_pretrain_never_imports_transfer():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("transfer"))
           for m, deps in graph.items() if m.startswith("pretrain")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_the_registry_imports_nothing_from_transfer():
    deps = import_graph()["transfer.registry"]
    assert deps <= {"transfer"}, sorted(deps)
