"""What the suite changes in an example before running it, and nothing else.

- ``to_tracklane``: the switch a user makes, done to the imports only. ``import mlflow`` (or
  ``import mlflow.sklearn``) becomes ``import tracklane.mlflow as mlflow``; ``from mlflow import X``
  becomes ``from tracklane.mlflow import X``; ``from mlflow.entities import ...`` is taken from
  ``tracklane.entities`` and ``from mlflow.tracking import MlflowClient`` from ``tracklane.mlflow``.
  Any other ``from mlflow.<module> import`` stays MLflow's (tracklane has no such module; a user
  keeps those lines).
- ``isolate``: lets the two variants share one server. The experiment names an example creates get
  a prefix of the variant's own (masked out of what it prints), the runs it puts in the Default
  experiment ("0") go to an experiment of its own, and ``/tmp/...`` paths go under its own
  working directory.
"""

from __future__ import annotations

import ast
import re

#: Calls whose argument is an experiment name (the position of the name among the arguments).
_NAME_ARGS = {
    "create_experiment": 0,
    "set_experiment": 0,
    "get_experiment_by_name": 0,
    "rename_experiment": 1,
}
_NAME_KEYWORDS = {"name", "experiment_name", "new_name"}

_SWAP_FROM = {
    "mlflow": "tracklane.mlflow",
    "mlflow.entities": "tracklane.entities",
    "mlflow.tracking": "tracklane.mlflow",
}


def to_tracklane(source: str) -> str:
    """The example with its MLflow imports swapped for tracklane's."""
    edits: list[tuple[int, int, int, int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = []
            for alias in node.names:
                if alias.name == "mlflow" or alias.name.startswith("mlflow."):
                    names.append(f"tracklane.mlflow as {alias.asname or 'mlflow'}")
                else:
                    names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
            replacement = "import " + ", ".join(names)
        elif isinstance(node, ast.ImportFrom) and node.module in _SWAP_FROM and node.level == 0:
            imported = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            replacement = f"from {_SWAP_FROM[node.module]} import {imported}"
        else:
            continue
        assert node.end_lineno is not None and node.end_col_offset is not None
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, replacement))
    return _apply(source, edits)


def _apply(source: str, edits: list[tuple[int, int, int, int, str]]) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        start = offsets[lineno - 1] + col
        end = offsets[end_lineno - 1] + end_col
        source = source[:start] + text + source[end:]
    return source


def experiment_names(source: str) -> set[str]:
    """The experiment names an example passes as literals (or through a variable set to one)."""
    tree = ast.parse(source)
    constants: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    constants[target.id] = node.value.value
    names: set[str] = set()

    def literal(arg: ast.expr) -> None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in constants:
            names.add(constants[arg.id])

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = (
            func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        )
        if called in _NAME_ARGS and len(node.args) > _NAME_ARGS[called]:
            literal(node.args[_NAME_ARGS[called]])
        for keyword in node.keywords:
            if called in _NAME_ARGS and keyword.arg in _NAME_KEYWORDS:
                literal(keyword.value)
            if keyword.arg == "experiment_names" and isinstance(keyword.value, ast.List | ast.Tuple):
                for element in keyword.value.elts:
                    literal(element)
    names.discard("Default")  # MLflow's own experiment "0", read only
    return names


_DEFAULT_EXPERIMENT = re.compile(r"""experiment_id(\s*=\s*)(["'])0\2""")


def isolate(source: str, prefix: str, experiment_id: str, workdir: str) -> str:
    """The example made to write only into what belongs to it (see the module docstring)."""
    for name in sorted(experiment_names(source), key=len, reverse=True):
        for quote in ('"', "'"):
            source = source.replace(f"{quote}{name}{quote}", f"{quote}{prefix}{name}{quote}")
    source = _DEFAULT_EXPERIMENT.sub(lambda m: f'experiment_id{m[1]}"{experiment_id}"', source)
    source = source.replace("file:///tmp/", f"file://{workdir}/tmp/").replace('"/tmp/', f'"{workdir}/tmp/')
    return source
