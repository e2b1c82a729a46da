"""Refresh the benchmark table of a README: run ``tracklane bench``'s figures, then write the table
between the README's ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers.

A maintainer's tool for this repository, not part of the package::

    python benchmarks/readme.py                 # full figures, into ./README.md
    python benchmarks/readme.py --quick         # smaller counts, under a minute
    python benchmarks/readme.py --from bench-results/bench.json   # a report already measured
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracklane._bench.figures import run_figures

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(path: Path, report: Mapping[str, Any]) -> None:
    """Replace what stands between the bench markers of ``path`` with the command and the table."""
    text = path.read_text()
    if START not in text or END not in text.split(START, 1)[1]:
        raise SystemExit(f"{path} has no {START} ... {END} markers to put the table between.")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    body = (
        f"\nProduced by `{report['command']}` ({report['started_at']}); `tracklane bench --quick` takes "
        "under a minute, and `benchmarks/README.md` says what each figure measures.\n\n"
        f"{report['table']}\n"
    )
    path.write_text(f"{head}{START}{body}{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file to rewrite")
    parser.add_argument("--quick", action="store_true", help="the figures at quick scale")
    parser.add_argument("--api-host", help="an MLflow server to measure (default: one started here)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench.json"), help="the JSON report")
    parser.add_argument("--from", dest="source", type=Path, help="use this report instead of measuring")
    args = parser.parse_args()
    if args.source is not None:
        report = json.loads(args.source.read_text())
    else:
        scale = "quick" if args.quick else "full"
        report = run_figures(scale=scale, api_host=args.api_host, out=args.out)
        if report["failures"]:
            print(f"Some figures failed ({', '.join(report['failures'])}): {args.readme} left as it was.")
            return 1
    update_readme(args.readme, report)
    print(f"Updated the table in {args.readme}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
