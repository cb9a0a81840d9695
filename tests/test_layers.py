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


def _is_submodule(package: str, name: str) -> bool:
    """`from package import name` names a module of the package (Python, or a C extension: the
    package's own __init__ is not what it reads)."""
    folder = ROOT.parent.joinpath(*package.split("."))
    return folder.is_dir() and (any(folder.glob(f"{name}.*")) or (folder / name).is_dir())


def imports(name: str, path: Path, known: dict[str, Path], *, type_checking: bool, inner: bool = False) -> set[str]:
    """What `name` imports at module level (with `if TYPE_CHECKING:` blocks when asked; with the
    imports inside functions and classes too when `inner`: an import deferred into a function
    to dodge a cycle is still the cycle)."""
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
                target = (f"{base}.{node.module}" if node.level else node.module or "") if node.module else base
                subs = {a.name for a in node.names if _is_submodule(target, a.name)}
                if len(subs) < len(node.names):  # (names from the module itself, not only its submodules)
                    found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif inner and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.Try,
                                             ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def cycles(type_checking: bool, *, inner: bool = False, packages: bool = False) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (of more than one
    package when `packages`: corem's top-level packages and modules, each a node)."""
    known = modules()
    graph = {n: imports(n, p, known, type_checking=type_checking, inner=inner) for n, p in known.items()}
    if packages:  # (a package's __main__ is a program on top of everything, not a part of its package)
        graph = {n: targets for n, targets in graph.items() if not n.endswith(".__main__")}
        top = {n: ".".join(n.split(".")[:2]) for n in graph}
        merged: dict[str, set[str]] = {t: set() for t in top.values()}
        for n, targets in graph.items():
            merged[top[n]].update(top[m] for m in targets if m in top and top[m] != top[n])
        graph = merged
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


def test_no_import_cycle_counting_imports_inside_functions():
    """An import moved into a function still ties the two modules: no cycle that way either."""
    assert cycles(type_checking=False, inner=True) == []


def test_no_import_cycle_between_packages():
    """corem's packages (coap, dtls, ingest, profiles, registry, ...) form no knot: whatever module
    of one imports another package, nothing of that package imports back (imports inside
    functions and for type hints counted)."""
    assert cycles(type_checking=True, inner=True, packages=True) == []


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
