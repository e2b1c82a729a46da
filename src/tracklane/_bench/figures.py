"""The figures: how much a tracking client costs a training loop, beside MLflow's own client.

Each figure is a module of this package (``python -m tracklane._bench.drain --scale quick`` runs one
by hand) and runs in a process of its own, so that no client's threads or imports colour another's
numbers. ``tracklane bench --figures`` runs them all against one server and writes a markdown table
and a JSON file holding every figure, the versions and the machine. They ship in the wheel: nothing
of a source checkout is needed.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._cli.mlflow_server import QUIET_MLFLOW
from .report import machine_info, markdown_table, server_version, versions
from .server import measured_server
from .targets import ratios, verdicts

#: Figure keys in the JSON file, in table order, with the module of this package that measures each.
FIGURES: dict[str, str] = {
    "1_caller_cost": "caller_cost",
    "2_end_to_end": "end_to_end",
    "3_mlflow_client": "mlflow_client",
    "4_drain": "drain",
    "5_training_loop": "training_loop",
    "6_memory": "memory",
    "7_import": "import_time",
    "8_offline": "offline",
    "9_artifacts": "artifacts",
    "10_lightning_logger": "lightning_logger",
    "11_run_edges": "run_edges",
    "12_kill": "kill",
    "13_sender": "sender",
}
SCALES = ("smoke", "quick", "full")
#: The longest one figure may run before it is stopped, by scale (seconds).
FIGURE_TIMEOUT = {"smoke": 60.0, "quick": 60.0, "full": 300.0}


def run_figures(
    *, scale: str, api_host: str | None, out: Path, only: str = "", command: str | None = None
) -> dict[str, Any]:
    """Every figure (or those ``only`` names by number) at ``scale``: the report, also in ``out``.

    The table is printed and written before returning; a figure that fails is in ``failures``.
    """
    wanted = {part.strip() for part in only.split(",") if part.strip()}
    figures = {k: v for k, v in FIGURES.items() if not wanted or k.split("_", 1)[0] in wanted}
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": command or f"tracklane bench --{'figures' if scale == 'full' else scale}",
        "scale": scale,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "figures": {},
        "failures": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="tracklane-bench-") as tmp,
        measured_server(api_host, Path(tmp)) as found,
    ):
        url, backend = found
        report["server"] = {
            "url": url,
            "backend": backend,
            "started_by_bench": api_host is None,
            "version": server_version(url),
        }
        print(f"tracklane bench ({scale}): MLflow server at {url}", flush=True)
        for figure, module in figures.items():
            result, error = run_figure(module, url, scale, Path(tmp))
            if result is not None:
                report["figures"][figure] = result
            if error is not None:
                report["failures"][figure] = error
                print(f"  {figure}: FAILED: {error.splitlines()[-1] if error else ''}", flush=True)
    report["targets"] = verdicts(report["figures"])
    report["ratios"] = ratios(report["figures"])
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["table"] = table = markdown_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")  # first: the table below may be cut short
    print()
    print(table)
    print(f"\nWrote {out} ({report['duration_s']:.0f}s).")
    return report


def run_figure(module: str, url: str, scale: str, tmp: Path) -> tuple[dict[str, Any] | None, str | None]:
    """One figure module in a fresh interpreter: its result, or why there is none."""
    out = tmp / f"{module}.json"
    cmd = [sys.executable, "-m", f"{__package__}.{module}", "--api-host", url, "--scale", scale]
    began = time.monotonic()
    print(f"  {module} ...", end="", flush=True)
    try:
        done = subprocess.run(
            [*cmd, "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=FIGURE_TIMEOUT[scale],
            cwd=tmp,
            env={**os.environ, **QUIET_MLFLOW},
        )
    except subprocess.TimeoutExpired as exc:
        print(" timed out", flush=True)
        return None, f"{module} did not finish within {exc.timeout:.0f}s"
    print(f" {time.monotonic() - began:.1f}s", flush=True)
    if done.returncode != 0 or not out.exists():
        return None, f"{module} exited with {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result, None
