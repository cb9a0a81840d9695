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


def test_no_import_cycle_in_type_hints_either():
    """Counting the imports made for type hints only: the server hands neither metrics nor the
    admin API itself (they get components), and Response has its own module."""
    assert cycles(type_checking=True) == []


def test_the_sans_io_layers_import_nothing_above_them():
    """codec <- coap <- (dtls, net): a layer never imports one above it, nor Trio below the edge."""
    known = modules()
    above = {"corem.codec": ("corem.coap", "corem.dtls", "corem.net", "corem.fastlane", "corem.server"),
             "corem.coap": ("corem.dtls", "corem.net", "corem.fastlane", "corem.ingest", "corem.server"),
             "corem.dtls": ("corem.net", "corem.fastlane", "corem.ingest", "corem.server")}
    for name, path in known.items():
        for layer, forbidden in above.items():
            if name == layer or name.startswith(layer + "."):
                bad = {m for m in imports(name, path, known, type_checking=True) if m.startswith(forbidden)}
                assert not bad, f"{name} imports {bad}"
                assert "import trio" not in path.read_text(), f"{name} imports trio: it is sans-IO"
