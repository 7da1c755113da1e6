"""Find import circles inside the lorakit package, imports inside functions included (``--module-level``:
only the ones that run at import time). ``if TYPE_CHECKING:`` imports never run and do not count.

    python tools/import_cycles.py      # prints each strongly connected group; exit 1 when there is one
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src"
PACKAGE = "lorakit"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names a ``from X import a, b`` may load: X itself, and X.a / X.b where those are modules."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node under an ``if TYPE_CHECKING:`` block: those imports never run."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                    (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def graph(deferred: bool = True) -> dict[str, set[str]]:
    """{module: the package modules it imports}; ``deferred``: imports inside functions count too (a circle
    dodged by importing inside a function is still a circle in the design)."""
    files = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        skipped = _type_checking_nodes(tree)
        nodes = ast.walk(tree) if deferred else iter(tree.body)
        for stmt in nodes:
            if id(stmt) in skipped:
                continue
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                targets = resolve(name, is_package, stmt)
            else:
                continue
            edges[name].update(t for t in targets if t in files and t != name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), ignoring package → own submodule edges,
    which Python resolves without a circle."""
    def counts(a: str, b: str) -> bool:
        return not b.startswith(a + ".")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if not counts(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = cycles(graph(deferred="--module-level" not in args))
    for group in found:
        print("circle:", " <-> ".join(group))
    print(f"{len(found)} import circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
