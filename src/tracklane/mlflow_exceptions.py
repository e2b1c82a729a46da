"""``tracklane.mlflow.exceptions``: MLflow's exception module, with or without MLflow.

``MlflowException`` is MLflow's own class when MLflow is installed (MLflow is imported when the name
is first looked up, not before), else tracklane's stand-in with the same attributes. Either way it
catches every error the MLflow faces raise (see ``tracklane._faces.mlflow_errors``). The other names
of ``mlflow.exceptions`` (``RestException``, ``MlflowTracingException`` ...) are MLflow's, when
installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._faces.mlflow_errors import mlflow_exception_class, mlflow_installed


def __getattr__(name: str) -> Any:
    if name == "MlflowException":
        return mlflow_exception_class()
    if name.startswith("__") or not mlflow_installed():
        hint = (
            ""
            if name.startswith("__")
            else "; MLflow's other exceptions need pip install 'tracklane[mlflow]'"
        )
        raise AttributeError(f"module 'tracklane.mlflow.exceptions' has no attribute {name!r}{hint}")
    return getattr(importlib.import_module("mlflow.exceptions"), name)
