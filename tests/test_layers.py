"""The package's import structure: layers that only point down, and no import cycles.

Every ``import`` of every module (also those inside functions, which run later but still
tie the modules together) is read with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_harmony"

#: The layer order, lowest first: a module may import from its own layer and those below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "volume", "fileio", "config", "imaging"),
    ("bids", "data"),
    ("metrics",),
    ("nn",),
    ("harmonizers",),
    ("interfaces",),
    ("workflows",),
    ("reports",),
    ("cli", "__main__"),
)


def _module_name(path: Path) -> str:
    parts = ("bids_harmony", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer; add '{top}' to LAYERS")


def _imports(module: str) -> set[str]:
    """The project modules ``module`` imports (a ``from package import submodule`` counts as
    the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    climbing = sorted(name for name in GRAPH[module] if _layer(name) > _layer(module))
    assert not climbing, f"{module} imports from a higher layer: {', '.join(climbing)}"


def test_no_import_cycles() -> None:
    """Depth-first search over the module graph; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for name in sorted(GRAPH[module]):
            if state.get(name) == 1:
                cycles.append(path[path.index(name):] + [name])
            elif name not in state:
                visit(name)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_imports() -> None:
    """The parser finds lazy imports inside functions, the kind that once formed a cycle."""
    assert "bids_harmony.cli.boutiques" in GRAPH["bids_harmony.cli.parser"]
    assert _layer("bids_harmony.reports") > _layer("bids_harmony.workflows.group")
