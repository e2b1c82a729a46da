"""The server a bench measures: the one given with ``--api-host``, else ``mlflow server`` started here.

A server started here stores into a fresh SQLite database in a temporary directory and is stopped
when the measurement ends, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .._cli.mlflow_server import MlflowServer


@contextlib.contextmanager
def measured_server(api_host: str | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """The server's URL and what it is (for the report)."""
    if api_host:
        yield api_host.rstrip("/"), "given"
        return
    workdir = tmp / "mlflow"
    workdir.mkdir()
    server = MlflowServer(workdir).start()
    try:
        yield server.url, "MLflow on SQLite, 1 worker, started here"
    finally:
        server.stop()
