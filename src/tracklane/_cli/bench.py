"""``tracklane bench``: how fast tracklane logs to a server, and beside MLflow's own client.

Two measurements, both shipped in the package (``tracklane._bench``), so they run from an installed
wheel anywhere. The capacity plan (the default) against the user's own server (``--api-host``): N
processes log into one run, beside the raw ``runs/log-batch`` ceiling. The figures (``--figures``,
``--quick``): one module per figure, each in a process of its own, a table and a JSON file.

This module only reads the arguments and dispatches; only the console script imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .args import positive_float, positive_int


def register(subparsers: Any) -> None:
    from .._bench.capacity import CAPACITY_EVENTS, CAPACITY_PROCESSES, DEFAULT_EXPERIMENT, process_counts

    parser = subparsers.add_parser(
        "bench",
        help="measure how fast tracklane logs to a server (a capacity plan), or the figures",
        description=(
            "Capacity plan (default): N processes log into one run on the server (--api-host, else "
            "`mlflow server` on SQLite started here on 127.0.0.1), side by side with the raw "
            "log-batch ceiling of N senders without tracklane; prints a markdown table. --figures "
            "(or --quick): the figures, next to MLflow's client on the same server, a table and a "
            "JSON file. Both ship in the package: no source checkout is needed."
        ),
    )
    server = parser.add_argument_group("server")
    server.add_argument("--api-host", help="measure against this server instead of starting one")
    server.add_argument(
        "--api-key", help="its API key (default: $OIP_WORKLOAD_ACCESS_KEY); never printed or written"
    )
    server.add_argument("--workspace-id", help="the OICM workspace to log into (OICM hosts only)")
    plan = parser.add_argument_group("capacity plan")
    plan.add_argument(
        "--processes",
        type=process_counts,
        default=CAPACITY_PROCESSES,
        help=f"process counts to measure, comma-separated (default: {CAPACITY_PROCESSES})",
    )
    plan.add_argument(
        "--events",
        type=positive_int,
        default=CAPACITY_EVENTS,
        help=f"metric points each process logs (default: {CAPACITY_EVENTS:,})",
    )
    plan.add_argument(
        "--repeats", type=positive_int, default=1, help="measurements per N; the table shows medians"
    )
    plan.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="longest one measurement may take, in seconds (default: 600)",
    )
    plan.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment that holds the runs measured (default: {DEFAULT_EXPERIMENT})",
    )
    figures = parser.add_argument_group("figures")
    figures.add_argument(
        "--figures", action="store_true", help="run the figures instead of the capacity plan"
    )
    figures.add_argument("--quick", action="store_true", help="the figures, smaller counts: under a minute")
    figures.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    figures.add_argument(
        "--only", help="comma-separated figure numbers to run (e.g. 1,4); default: all", default=""
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the JSON report here (figures: default bench-results/bench.json; capacity plan: none)",
    )
    parser.set_defaults(run=run, _parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.figures or args.quick or args.smoke or args.only:
        if args.api_key or args.workspace_id:
            args._parser.error("--api-key and --workspace-id apply to the capacity plan, not to --figures")
        from .._bench.figures import run_figures

        scale = "smoke" if args.smoke else "quick" if args.quick else "full"
        out: Path = args.out if args.out is not None else Path("bench-results/bench.json")
        report = run_figures(scale=scale, api_host=args.api_host, out=out, only=args.only)
        return 1 if report["failures"] else 0
    from .._bench.capacity import run_capacity

    return run_capacity(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tracklane._cli.bench ...``: the same as ``tracklane bench ...``."""
    parser = argparse.ArgumentParser(prog="tracklane")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
