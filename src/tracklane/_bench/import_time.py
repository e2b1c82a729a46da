"""Figure 7: ``import tracklane`` time next to ``import mlflow``.

Each import runs in a fresh interpreter (nothing cached in ``sys.modules``; the OS file cache is
warm after the first run, as it is for a user's second start); the time is measured inside the
interpreter around the import statement alone. Medians over repeats. The slowest modules under
``import tracklane`` (from ``python -X importtime``) are listed in the notes: they are what
bounds the figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from . import harness

COUNTS = {"smoke": {"repeats": 1}, "quick": {"repeats": 1}, "full": {"repeats": 7}}
MODULES = ("tracklane", "mlflow")


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def _importtime(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [line for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line]


def slowest_imports(module: str, top: int = 6) -> list[tuple[str, float]]:
    """(module, cumulative ms) of the heaviest imports that ``module`` pulls in from elsewhere
    (a listed module's own submodules are left out: its time includes theirs)."""
    startup = {line.rsplit("|", 1)[1].strip() for line in _importtime("pass")}
    rows = []
    for line in _importtime(f"import {module}"):
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if cumulative.isdigit() and name.split(".")[0] != module and name not in startup:
            rows.append((name, int(cumulative) / 1000))
    rows.sort(key=lambda row: -row[1])
    picked: list[tuple[str, float]] = []
    for name, ms in rows:
        if not any(name.startswith(f"{other}.") for other, _ in picked):
            picked.append((name, ms))
    return picked[:top]


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("7_import", "Figure 7: import time, fresh interpreter")
    harness.banner(figure, args)
    repeats = COUNTS[args.scale]["repeats"]
    figure.params = {"repeats": repeats}
    modules = [m for m in MODULES if importlib.util.find_spec(m) is not None]
    figure.skipped += [f"{m} is not installed" for m in MODULES if m not in modules]
    times: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(repeats):
        for module in modules:
            times[module].append(import_seconds(module))
    for module in modules:
        figure.add(f"import_{module}_ms", f"import {module}", harness.median(times[module]) * 1e3, "ms")
    heaviest = slowest_imports("tracklane")
    figure.params["tracklane_heaviest_imports_ms"] = heaviest
    figure.note("heaviest under import tracklane: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in heaviest))
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    measure(args).finish(args)


if __name__ == "__main__":
    main()
