"""What the figure modules share: arguments, servers, timing, child processes and output.

Every figure runs by hand (``python -m tracklane._bench.caller_cost``) and prints its numbers;
``tracklane bench`` runs the same modules with ``--api-host``, ``--scale`` and ``--json`` and
collects what they write. Nothing here asserts on a number.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._cli.mlflow_server import MlflowServer
from .sink import SinkServer
from .targets import fmt, verdicts


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--api-host", help="an MLflow server to use (default: start one on 127.0.0.1)")
    parser.add_argument("--scale", choices=("smoke", "quick", "full"), default="full")
    parser.add_argument("--json", type=Path, help="also write the figure to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement in a clean process
    parser.add_argument("--child-arg", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


@contextlib.contextmanager
def mlflow_server(args: argparse.Namespace) -> Iterator[str]:
    """The server given with --api-host, else a fresh ``mlflow server`` for this script."""
    if args.api_host:
        yield args.api_host.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="tracklane-bench-") as tmp:
        print("starting mlflow server ...", flush=True)
        server = MlflowServer(Path(tmp)).start()
        try:
            yield server.url
        finally:
            server.stop()


@contextlib.contextmanager
def sink_server() -> Iterator[SinkServer]:
    sink = SinkServer().start()
    try:
        yield sink
    finally:
        sink.stop()


_scratch: list[str] = []


def storage_dir() -> str:
    """A fresh directory for one client's journal, removed when this process ends.

    A client keeps events it could not deliver (an abandoned flush, an outage) in a journal, by
    default under the working directory, and a later client there would replay them: each
    benchmark client gets a journal of its own so no figure sends another's events.
    """
    path = tempfile.mkdtemp(prefix="tracklane-bench-journal-")
    if not _scratch:
        atexit.register(_remove_scratch)
    _scratch.append(path)
    return path


def _remove_scratch() -> None:
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


def client(url: str, **settings: Any) -> Any:
    """A TrackingClient for ``url``: online (whatever ``$OIP_OFFLINE_MODE`` says), own journal."""
    from tracklane import TrackingClient

    return TrackingClient(api_host=url, offline_mode=False, path_to_storage=storage_dir(), **settings)


def spilled(tc: Any) -> int:
    """Events a client sent through its journal instead of straight to the server (0 if unknown)."""
    stats = getattr(tc, "stats", None)
    return int(stats().get("spilled", 0)) if callable(stats) else 0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed_calls(fn: Callable[[int], None], n: int) -> float:
    """Seconds for ``fn(n)``, which makes ``n`` calls in a loop of its own."""
    gc.collect()
    began = time.perf_counter()
    fn(n)
    return time.perf_counter() - began


def peer_available(name: str, scale: str) -> str | None:
    """None when ``name`` is installed here, else why not (as a line for the report)."""
    if scale == "smoke":
        return f"{name}: peers are not measured at smoke scale"
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed; `pip install 'tracklane[bench]'` adds it"
    return None


def peer_env(tmp: str) -> dict[str, str]:
    """Environment for the peers: W&B offline and silent, trackio local, both under ``tmp``."""
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": tmp,
        "WANDB_CONSOLE": "off",
        "TRACKIO_DIR": str(Path(tmp) / "trackio"),
    }


def child(
    script: str, name: str, arg: Any = "", *, env: dict[str, str] | None = None, timeout: float = 240
) -> Any:
    """Run one measurement (``--child name``) of the figure module whose file is ``script`` in a fresh
    interpreter (``python -m``, as ``tracklane bench`` runs it); its JSON result.

    A child process gives each measurement a clean baseline: no other client's threads, imports
    or garbage in it.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        module = f"{__package__}.{Path(script).stem}"
        cmd = [sys.executable, "-m", module, "--child", name, "--child-arg", json.dumps(arg)]
        cmd += ["--json", str(out)]
        # A scratch working directory: whatever a client leaves in its cwd stays out of the tree.
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=storage_dir()
        )
        if done.returncode != 0 or not out.stat().st_size:
            raise RuntimeError(f"{script} --child {name} exited {done.returncode}: {done.stderr[-2000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def child_result(args: argparse.Namespace, result: Any) -> None:
    """In a child: hand ``result`` back and leave at once (no exit flush of any client)."""
    args.json.write_text(json.dumps(result))
    _remove_scratch()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Figure:
    """One figure family's measurements, the counts that produced them, and what was skipped."""

    def __init__(self, name: str, title: str) -> None:
        self.name = name
        self.title = title
        self.measurements: dict[str, dict[str, Any]] = {}
        self.params: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.notes: list[str] = []

    def add(self, key: str, label: str, value: float, unit: str, **extra: Any) -> None:
        self.measurements[key] = {"label": label, "value": value, "unit": unit, **extra}
        print(f"  {label}: {fmt(value)} {unit}", flush=True)

    def skip(self, line: str) -> None:
        self.skipped.append(line)
        print(f"  skipped: {line}", flush=True)

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(f"  note: {line}", flush=True)

    def finish(self, args: argparse.Namespace) -> None:
        result = {
            "title": self.title,
            "scale": args.scale,
            "params": self.params,
            "measurements": self.measurements,
            "skipped": self.skipped,
            "notes": self.notes,
        }
        for verdict in verdicts({self.name: result}):
            print(f"  target {verdict['target']} ({verdict['rule']}): {verdict['note']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


def banner(figure: Figure, args: argparse.Namespace) -> None:
    print(f"{figure.title} [{args.scale}]", flush=True)
