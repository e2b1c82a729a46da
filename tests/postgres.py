"""A real PostgreSQL on 127.0.0.1 and an MLflow server that stores into it with several workers.

This is the setup users outgrow SQLite into: MLflow's SQLAlchemy store on PostgreSQL behind more
than one server worker. The launchers live in ``tracklane._cli.bench``, where ``tracklane bench
--postgres`` starts the same setup; the tests use them from there, and the pytest fixtures
(``conftest.py``) turn ``PostgresNotFound`` into a skip.
"""

from __future__ import annotations

from tracklane._cli.bench import PgMlflowServer, PostgresNotFound, PostgresServer, find_postgres_bin

__all__ = ["PgMlflowServer", "PostgresNotFound", "PostgresServer", "find_postgres_bin"]
