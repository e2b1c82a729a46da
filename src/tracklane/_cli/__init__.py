"""The ``tracklane`` console script: ``tracklane sync``, ``tracklane ui`` and ``tracklane bench``.

Each subcommand lives in its own module and registers its arguments here; this file only
dispatches. Help text is plain text (what a terminal shows), never reST.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__

DESCRIPTION = (
    "tracklane: experiment tracking for MLflow and OICM servers that never slows your training "
    "loop and loses nothing. The library is used from Python; this command uploads what was "
    "logged offline or kept through an outage, shows it in MLflow's web UI, and measures "
    "throughput."
)
EPILOG = "Run 'tracklane COMMAND --help' for the options of a command."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `tracklane` alone: say what there is, as --help does
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracklane", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tracklane {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for module in _subcommands():
        module.register(commands)
    return parser


def _subcommands() -> list[Any]:
    """Subcommand modules, imported only when the console script runs."""
    import importlib

    found: list[Any] = []
    for name in ("tracklane._cli.sync", "tracklane._cli.ui", "tracklane._cli.bench"):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


if __name__ == "__main__":
    sys.exit(main())
