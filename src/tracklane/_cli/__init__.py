"""The ``tracklane`` console script: ``tracklane sync`` and ``tracklane bench``.

Each subcommand lives in its own module and registers its arguments here; this file only
dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracklane", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in _subcommands():
        module.register(commands)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _subcommands() -> list[Any]:
    """Subcommand modules, imported only when the console script runs."""
    import importlib

    found: list[Any] = []
    for name in ("tracklane._cli.sync", "tracklane._cli.bench"):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


if __name__ == "__main__":
    sys.exit(main())
