"""The capacity plan on PostgreSQL: start PostgreSQL and ``mlflow server --workers N`` on it on
127.0.0.1, then run ``tracklane bench`` (the capacity plan) against that server.

Needs a source checkout (the PostgreSQL launcher is the tests' own, ``tests/postgres.py``), Debian's
``postgresql`` package, mlflow and ``psycopg[binary]`` (the ``test`` extra). Every other option is
``tracklane bench``'s::

    python benchmarks/capacity_postgres.py --server-workers 2 --processes 1,2,4 --events 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tracklane._cli import main as tracklane

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres import PgMlflowServer, PostgresNotFound, PostgresServer


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server workers (default: 2)")
    args, rest = parser.parse_known_args()
    if any(arg == "--api-host" or arg.startswith("--api-host=") for arg in rest):
        parser.error("--api-host names a server to measure; this script starts its own: leave it out")
    print("starting PostgreSQL and mlflow server on it ...", flush=True)
    database = PostgresServer()
    with tempfile.TemporaryDirectory(prefix="tracklane-bench-pg-") as tmp:
        try:
            database.start()
            server = PgMlflowServer(Path(tmp), database.url, workers=args.server_workers).start()
        except (PostgresNotFound, RuntimeError) as exc:
            database.stop()
            raise SystemExit(f"capacity_postgres: {exc}") from None
        try:
            return tracklane(["bench", "--api-host", server.url, *rest])
        finally:
            server.stop()
            database.stop()


if __name__ == "__main__":
    sys.exit(main())
