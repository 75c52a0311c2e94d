"""The package's shape: layers import only downwards, no import circles, no private names across modules, small
files and functions. Every import counts, function-local and TYPE_CHECKING ones included: they are where cycles hide.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nas"

# Lowest first. A module may import its own layer and the ones before it.
LAYERS = (
    ("nas.errors", "nas.config", "nas.system"),
    ("nas.arch",),
    ("nas.space",),
    ("nas.latency",),
    ("nas.detect",),
    ("nas.search",),
    ("nas.report",),
    ("nas.commands", "nas.__main__"),
)
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, and why.
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None  # the lazy facade nas/__init__.py


def _imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported nas module, names imported from it, line)]."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("nas"):
                names = [a.name for a in node.names]
                subs = [f"{node.module}.{n}" for n in names if (PACKAGE.parent / f"{node.module}.{n}".replace(".", "/")).is_dir()
                        or (PACKAGE.parent / (f"{node.module}.{n}".replace(".", "/") + ".py")).is_file()]
                found += [(s, [], node.lineno) for s in subs]
                found.append((node.module, [n for n in names if f"{node.module}.{n}" not in subs], node.lineno))
            elif isinstance(node, ast.Import):
                found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("nas")]
        out[module] = found
    return out


IMPORTS = _imports()


def test_every_module_has_a_layer():
    assert [m for m in IMPORTS if _layer(m) is None] == ["nas"]


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (layer {_layer(m)}) imports {target} (layer {_layer(target)}), line {line}"
           for m, found in IMPORTS.items() if m != "nas"
           for target, _, line in found if _layer(target) is not None and _layer(target) > _layer(m)]
    assert bad == []


def test_no_import_circles():
    graph = {m: {t for t, _, _ in found if t in IMPORTS and t != m} for m, found in IMPORTS.items()}
    # a package's __init__ is imported with each of its modules: count an edge to the package only for what it holds
    circles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_no_private_name_is_imported_across_modules():
    bad = [f"{m} imports {n} from {t} (line {line})" for m, found in IMPORTS.items()
           for t, names, line in found for n in names if n.startswith("_") and t != m]
    assert bad == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_files_and_functions_are_small(path: Path):
    text = path.read_text()
    rel = str(path.relative_to(PACKAGE.parent))
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{rel}: {len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS]
    assert long == [], rel
