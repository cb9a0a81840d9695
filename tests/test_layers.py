"""The import graph of corem: no module imports one that imports it back (a cycle makes the
layers one knot: neither can be read, tested or changed alone)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "corem"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path], *, type_checking: bool) -> set[str]:
    """What `name` imports at module level (with `if TYPE_CHECKING:` blocks when asked)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if type_checking:
                    visit(node.body)
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def cycles(type_checking: bool) -> list[list[str]]:
    known = modules()
    graph = {n: imports(n, p, known, type_checking=type_checking) for n, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def test_no_import_cycle_at_run_time():
    assert cycles(type_checking=False) == []


def test_the_only_cycle_in_type_hints_is_the_one_left_to_untie():
    """Counting the imports made for type hints only.  blockwise <-> resources went (Response has
    its own module); what remains is the server handing itself to metrics and the admin API,
    which issue 15 replaces with components that expose their own counters."""
    assert cycles(type_checking=True) == [["corem.admin.api", "corem.metrics", "corem.server"]]
