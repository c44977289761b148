"""The shape of the package, checked from its source (docs/architecture.md draws it):

* no import circle among featcache's modules (``jobs/`` is ``featcache.jobs``), counting the
  imports made inside functions, not those made only for type checkers;
* only the stores import redis-py or SQLAlchemy at run time: every Redis command and SQL
  statement goes through them, and their errors are translated there;
* no module reads a private name (``_x``) of another module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: modules allowed to import redis-py / SQLAlchemy at run time: the stores, and the tools that
#: run servers and databases of their own (the demo, the embedded server, cluster and Sentinel)
REDIS_MODULES = {"featcache.redis_store", "featcache.redis_store.base",
                 "featcache.redis_store.errors", "featcache.redis_store.scripts",
                 "featcache.redis_store.standalone", "featcache.redis_store.cluster",
                 "featcache.redis_store.cluster_store", "featcache.redis_store.admin",
                 "featcache.redis_store.aio", "featcache.redis_store.lanes",
                 "featcache.embedded", "featcache.embedded_cluster",
                 "featcache.embedded_sentinel", "featcache.demo.run"}
SQL_MODULES = {"featcache.offline", "featcache.offline.store", "featcache.offline.bulk",
               "featcache.offline.arrow", "featcache.offline.changes", "featcache.offline.text",
               "featcache.offline.checks",
               "featcache.demo.run", "featcache.demo.data"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((ROOT / "featcache").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        parts = ("featcache", "jobs", *path.relative_to(ROOT / "jobs").with_suffix("").parts)
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, name imported from it or None, line) for each run-time import."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), alias.name, node.lineno


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for imported, _, _ in _imports(module):
            target = imported
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module and target != "featcache":
                graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle() -> None:
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()) or [])


def test_only_the_stores_import_redis_or_sqlalchemy_at_run_time() -> None:
    found = []
    for module in MODULES:
        for target, _, line in _imports(module):
            top = target.partition(".")[0]
            if (top == "redis" and module not in REDIS_MODULES) or (
                    top == "sqlalchemy" and module not in SQL_MODULES):
                found.append(f"{module}:{line} imports {target}")
    assert not found, "\n".join(found)


def test_no_module_reads_another_modules_private_names() -> None:
    found = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module):
            if (name and name.startswith("_") and not name.startswith("__")
                    and target.startswith("featcache") and target != module):
                found.append(f"{module}:{line} imports {name} from {target}")
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name.partition(".")[0]
                    for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names}
        ours = {alias.asname or alias.name.rpartition(".")[2]
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and ((node.module or "").startswith("featcache") or node.level)
                for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id not in ("self", "cls")
                    and (node.value.id in ours or node.value.id not in imported)):
                found.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_the_checks_see_the_package() -> None:
    """The control: the walk finds the modules and the imports it is about."""
    assert {"featcache.client", "featcache.readpath", "featcache.jobs.cli"} <= set(MODULES)
    assert "featcache.readpath" in _edges()["featcache.client"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def drawing() -> str:
    """Every module by layer (a module imports only modules of lower layers), with the
    featcache modules it imports: what docs/architecture.md shows."""
    graph = _edges()
    short = {m: m.removeprefix("featcache.") for m in graph}
    layer: dict[str, int] = {}

    def depth(module: str) -> int:
        if module not in layer:
            layer[module] = 1 + max((depth(m) for m in graph[module]), default=-1)
        return layer[module]

    lines = []
    for level in range(max(map(depth, graph)) + 1):
        lines.append(f"layer {level}")
        for module in sorted(m for m in graph if layer[m] == level and m != "featcache"):
            uses = ", ".join(sorted(short[m] for m in graph[module])) or "-"
            lines.append(f"  {short[module]:<24} {uses}")
    return "\n".join(lines)


def test_the_docs_draw_the_imports_as_they_are() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    begin, end = "<!-- imports: begin -->\n```\n", "\n```\n<!-- imports: end -->"
    assert begin in doc and end in doc, "docs/architecture.md lost its import drawing"
    drawn = doc[doc.index(begin) + len(begin):doc.index(end)]
    assert drawn == drawing(), (
        "docs/architecture.md draws the imports of another code; paste this:\n" + drawing())


if __name__ == "__main__":  # python tests/test_architecture.py: print the drawing for the docs
    print(drawing())
