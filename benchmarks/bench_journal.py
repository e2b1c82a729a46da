"""The local journal: offline logging throughput end to end, and bytes per metric point on disk.

``TrackingClient(offline_mode=True)`` logs N single-metric events (``log_metric`` with a step),
timed from the first call to the end of ``flush()``; then ``close()``, and the journal's files
(database, WAL, shared memory) are summed and divided by N. Targets (issue 4): at least 200,000
events/s and at most 60 bytes per point. Prints numbers; asserts nothing.

    python benchmarks/bench_journal.py [--events 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tracklane import TrackingClient


def one_run(events: int, storage: Path) -> tuple[float, float, float]:
    """(events/s end to end, caller µs per call, bytes per point) of one offline run."""
    tc = TrackingClient(offline_mode=True, path_to_storage=str(storage))
    tc.set_experiment("bench-journal")
    tc.start_run(run_name="bench", log_system_metrics=False)
    log = tc.log_metric
    started = time.perf_counter()
    for step in range(events):
        log("loss", 1.0 / (step + 1), step=step)
    logged = time.perf_counter()
    tc.flush()
    flushed = time.perf_counter()
    tc.close()
    on_disk = sum(p.stat().st_size for p in (storage / "ml_runs").iterdir() if p.is_file())
    return events / (flushed - started), (logged - started) / events * 1e6, on_disk / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rates, callers, sizes = [], [], []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="tracklane-bench-journal-") as tmp:
            rate, caller, size = one_run(args.events, Path(tmp))
        rates.append(rate)
        callers.append(caller)
        sizes.append(size)
        print(f"run {i + 1}: {rate:,.0f} events/s end to end, {caller:.2f} µs per call, {size:.1f} B/point")
    print(
        f"offline journal, {args.events:,} metric events: median {statistics.median(rates):,.0f} events/s "
        f"(target >= 200,000), caller {statistics.median(callers):.2f} µs/call, "
        f"{statistics.median(sizes):.1f} bytes per metric point on disk (target <= 60)"
    )


if __name__ == "__main__":
    main()
