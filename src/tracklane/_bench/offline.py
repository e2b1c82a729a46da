"""Figure 8: offline mode, events/s into the local journal and bytes per metric point on disk.

tracklane: ``TrackingClient(offline_mode=True, path_to_storage=DIR)``, journal under
``DIR/ml_runs/``; N metric events logged 10 keys a step, timed from the first call to the end of
``flush()``; then ``close()``, and the files under ``DIR/ml_runs`` are summed and divided by N
(the fixed cost of one experiment and run is in it, small at these N). When offline mode does not
work in this checkout yet, the figure says so and why, and measures nothing.

Peers, when installed, the same way: W&B with ``WANDB_MODE=offline`` (its ``.wandb`` file, up to
``run.finish()``) and trackio local (its directory, up to ``trackio.finish()``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import harness

COUNTS = {"smoke": {"events": 2_000}, "quick": {"events": 20_000}, "full": {"events": 100_000}}
KEYS = [f"metric_{i}" for i in range(10)]


def tree_bytes(root: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


def offline_child(client: str, events: int, storage: str) -> dict[str, Any]:
    """Log ``events`` metric points with ``client`` into ``storage``; events/s and bytes on disk."""
    steps = events // len(KEYS)
    values = {key: 0.0 for key in KEYS}
    root = Path(storage)
    if client == "tracklane":
        for name in ("OIP_TRACKING_SERVER", "OIP_WORKLOAD_ACCESS_KEY"):
            os.environ.pop(name, None)  # offline must not find a server to talk to
        from tracklane import TrackingClient

        try:
            tc = TrackingClient(offline_mode=True, path_to_storage=storage)
            tc.set_experiment("bench-offline")
            tc.start_run(run_name="offline")
        except Exception as exc:
            return {"skipped": f"offline mode is not available yet: {type(exc).__name__}: {exc}"}
        log = tc.log_metrics
        began = time.perf_counter()
        for step in range(steps):
            for i, key in enumerate(KEYS):
                values[key] = step * 0.5 + i
            log(values, step)
        if not tc.flush(timeout=300):
            return {"skipped": "offline flush() did not finish within 300s"}
        elapsed = time.perf_counter() - began
        tc.close(timeout=60)
        journal = root / "ml_runs"
        size = tree_bytes(journal) if journal.is_dir() else 0
        if size == 0:
            return {"skipped": f"offline mode ran but wrote nothing under {journal}"}
    elif client == "wandb":
        import wandb

        run = wandb.init(project="tracklane-bench", name="offline", dir=storage)
        began = time.perf_counter()
        for step in range(steps):
            for i, key in enumerate(KEYS):
                values[key] = step * 0.5 + i
            run.log(values, step=step)
        run.finish()
        elapsed = time.perf_counter() - began
        size = tree_bytes(root, "*.wandb")
    else:
        import trackio

        trackio.init(project="tracklane-bench", name="offline", auto_log_cpu=False, auto_log_gpu=False)
        began = time.perf_counter()
        for step in range(steps):
            for i, key in enumerate(KEYS):
                values[key] = step * 0.5 + i
            trackio.log(values, step=step)
        trackio.finish()
        elapsed = time.perf_counter() - began
        size = tree_bytes(Path(os.environ["TRACKIO_DIR"]))
    return {"events_per_s": steps * len(KEYS) / elapsed, "bytes": size, "events": steps * len(KEYS)}


def measure(args: argparse.Namespace) -> harness.Figure:
    figure = harness.Figure("8_offline", "Figure 8: offline mode into local storage")
    harness.banner(figure, args)
    events = COUNTS[args.scale]["events"]
    figure.params = {"events": events, "keys_per_step": len(KEYS)}
    clients = [("tracklane", "tracklane offline journal")]
    for peer, label in (("wandb", "W&B offline"), ("trackio", "trackio local")):
        missing = harness.peer_available(peer, args.scale)
        if missing:
            figure.skip(missing)
        else:
            clients.append((peer, label))
    for client, label in clients:
        with tempfile.TemporaryDirectory(prefix=f"bench-offline-{client}-") as tmp:
            spec = {"client": client, "events": events, "storage": tmp}
            try:
                got = harness.child(__file__, "offline", spec, env=harness.peer_env(tmp))
            except RuntimeError as exc:
                if client == "tracklane":
                    raise
                got = {"skipped": f"failed: {str(exc).splitlines()[-1]}"}
        if "skipped" in got:
            figure.skip(f"{label}: {got['skipped']}")
            continue
        figure.add(
            f"{client}_events_per_s",
            f"{label}: end to end, {events:,} events",
            got["events_per_s"],
            "events/s",
        )
        figure.add(
            f"{client}_bytes_per_point",
            f"{label}: bytes on disk per metric point",
            got["bytes"] / got["events"],
            "bytes",
        )
    return figure


def main() -> None:
    args = harness.parse_args(__doc__)
    if args.child == "offline":
        spec = json.loads(args.child_arg)
        harness.child_result(args, offline_child(spec["client"], spec["events"], spec["storage"]))
    measure(args).finish(args)


if __name__ == "__main__":
    main()
