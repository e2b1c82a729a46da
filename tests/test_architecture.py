"""The package's shape, checked: layers that point one way (faces, run models, engine, stores, wire,
ground), no import cycle between its modules, and one module that decides what a server's reply
means."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tracklane"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (TYPE_CHECKING ones too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:  # `from . import x` may name a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name and m != "tracklane"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_package_modules() -> None:
    graph = _imports()
    assert len(graph) > 20  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


#: The layers, top first: a module imports only from its own layer or those below it. Each entry is
#: a module or package prefix; every module of the package must belong to exactly one layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "faces",
        (
            "tracklane",  # the package itself: re-exports the faces
            "tracklane.mlflow",
            "tracklane.entities",
            "tracklane.integrations",
            "tracklane._faces",
            "tracklane._artifacts",  # artifact kinds (tables, images, ...) the faces log
            "tracklane._cli",
        ),
    ),
    ("run models", ("tracklane._runs", "tracklane._runtime")),
    ("engine", ("tracklane._delivery",)),
    ("stores", ("tracklane._stores",)),
    ("wire", ("tracklane._wire",)),
    (
        "ground",
        (
            "tracklane._entities",
            "tracklane._end_status",  # the one rule for a run's end status
            "tracklane._artifacts.paths",  # the one check that a path stays inside its destination
            "tracklane._exceptions",
            "tracklane._limits",
            "tracklane._settings",
            "tracklane._validation",
        ),
    ),
]


def _layer(module: str) -> int:
    """The index of ``module``'s layer: the longest matching prefix decides."""
    best, depth = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    return best


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in _imports() if _layer(m) < 0)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_layers_point_one_way() -> None:
    graph = _imports()
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _layer(target) < _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_stores_never_import_the_engine() -> None:
    graph = _imports()
    offenders = {
        module: sorted(t for t in targets if t.startswith("tracklane._delivery"))
        for module, targets in graph.items()
        if module.startswith("tracklane._stores")
    }
    assert not any(offenders.values()), offenders


def test_the_engine_imports_no_run_model_or_face() -> None:
    graph = _imports()
    engine_side = [m for m in graph if m.startswith("tracklane._delivery")]
    for module in engine_side:
        above = {
            m
            for m in graph[module]
            if m.startswith(("tracklane._runs", "tracklane._faces", "tracklane._runtime"))
        }
        assert not above, f"{module} imports {above}"


def test_only_the_outcome_module_decides_by_http_status() -> None:
    # Status codes as numbers in a comparison or a set: only in _wire/outcome.py.
    pattern = re.compile(r"(status\s*(==|>=|<=|<|>|in)\s*\(?\s*\d{3})|(\b(401|403|408|429|502|503|504)\b)")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "outcome.py" or path.parent.name == "_bench":  # the bench checks its own probes
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.strip().startswith(('"', 'f"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
