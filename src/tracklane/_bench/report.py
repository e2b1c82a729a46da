"""What a bench report says about where it ran: the machine, the versions, the server, the table.

Every report carries them, so a figure read later can be told apart from one taken on another
machine or another release.
"""

from __future__ import annotations

import contextlib
import os
import platform
import urllib.error
import urllib.request
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .targets import fmt


def machine_info() -> dict[str, Any]:
    """The cores, CPU model, RAM and Python this report was measured on."""
    import psutil

    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str | None]:
    """The installed versions of tracklane, MLflow, their dependencies and the peers (None: absent)."""
    found: dict[str, str | None] = {}
    for name in ("tracklane", "mlflow", "aiohttp", "orjson", "anyio", "psutil", "wandb", "trackio"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def server_version(url: str) -> str | None:
    """What the server's ``/version`` answers, or None when it does not."""
    try:
        with urllib.request.urlopen(f"{url}/version", timeout=5) as reply:
            return reply.read(100).decode(errors="replace").strip() or None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as one markdown table: a row per measurement, targets beside their figure."""
    by_key = {(t["figure"], t["key"]): t for t in report.get("targets", [])}
    lines = [
        "| # | measurement | value | target |",
        "|---|---|---:|---|",
    ]
    skipped: list[str] = []
    notes: list[str] = []
    for figure, result in report["figures"].items():
        number = figure.split("_", 1)[0]
        for key, m in result.get("measurements", {}).items():
            target = by_key.get((figure, key))
            verdict = ""
            if target is not None:
                verdict = f"{target['rule']}: {target['note']}"
                for other in report.get("targets", []):
                    if other is not target and (other["figure"], other["key"]) == (figure, key):
                        verdict += f"; {other['rule']}: {other['note']}"
            lines.append(f"| {number} | {m['label']} | {fmt(float(m['value']))} {m['unit']} | {verdict} |")
        skipped += [f"{number}: {line}" for line in result.get("skipped", [])]
        notes += [f"{number}: {line}" for line in result.get("notes", [])]
    machine = report["machine"]
    versions = report["versions"]
    foot = [
        "",
        f"`{report['command']}` on {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}; tracklane {versions.get('tracklane')}, "
        f"mlflow {versions.get('mlflow')} (server {report.get('server', {}).get('version')} on 127.0.0.1), "
        f"{report.get('duration_s', 0):.0f}s.",
    ]
    if report.get("ratios"):
        foot += ["", "Ratios:", *[f"- {label}: {value:,.2f}x" for label, value in report["ratios"].items()]]
    if notes:
        foot += ["", "Notes:", *[f"- {line}" for line in notes]]
    if skipped:
        foot += ["", "Skipped:", *[f"- {line}" for line in skipped]]
    for figure, error in report.get("failures", {}).items():
        foot.append(f"- {figure} FAILED: {error.splitlines()[0]}")
    return "\n".join(lines + foot)
