"""``tracklane sync [PATH] --to URL``: upload a journal's offline runs and outage leftovers.

Offline runs get an experiment (found or created by name) and a run with their name, start time,
status and end time; runs spilled during an outage go to the server run they came from. Every
param, tag and metric point goes through log-batch. The journal records each run's server id and
how far delivery got, after every request, so an interrupted sync resumes and a repeated sync
sends nothing twice. A server run also carries the tag ``tracklane.offline_run_id``: if a sync
dies between creating a run and recording it, the next sync finds that run instead of making a
second one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .._delivery.batching import KIND_NAMES, Event
from .._delivery.upload import upload_run
from .._exceptions import ConfigurationError, ServerError, ServerUnavailableError, TrackingError
from .._settings import ServerConfig, resolve_server
from .._stores.journal import Delivery, Journal, journal_file, server_key
from .._stores.rest import RestBackend

#: Tag put on a server run created from an offline run: the offline run's id.
OFFLINE_RUN_TAG = "tracklane.offline_run_id"


@dataclass
class SyncReport:
    """What one sync did."""

    runs: int = 0
    sent: int = 0
    pending: int = 0
    rejected: list[tuple[Event, str]] = field(default_factory=list)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sync",
        help="upload offline runs and outage leftovers from a local journal to a tracking server",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "path", nargs="?", default=".", help="path_to_storage you logged to (default .), or its ml_runs"
    )
    parser.add_argument("--to", dest="to", help="tracking server URL (default $OIP_TRACKING_SERVER)")
    parser.add_argument("--api-key", help="API key (default $OIP_WORKLOAD_ACCESS_KEY)")
    parser.add_argument("--workspace-id", help="OICM workspace to create experiments in (required on OICM)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent, send nothing")
    parser.add_argument(
        "--retry-window", type=float, default=30.0, help="seconds to keep retrying an unreachable server"
    )
    parser.set_defaults(run=main)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``tracklane sync``; the exit status: 0 done, 1 could not finish (run it again), 2 rows refused."""
    out = out or sys.stdout
    try:
        server = resolve_server(args.to, args.api_key)
        if server is None:
            raise ConfigurationError("Where to? Pass --to URL (or set OIP_TRACKING_SERVER).")
        workspace = args.workspace_id or None
        if server.is_oicm and not workspace:
            raise ConfigurationError(
                f"{server.api_host} is an OICM host, where experiments live in a workspace: pass "
                "--workspace-id."
            )
        journal = Journal(journal_file(args.path), create=False)
    except TrackingError as exc:
        print(f"tracklane sync: {exc}", file=sys.stderr)
        return 1
    target = server_key(server.api_host, workspace)
    try:
        if args.dry_run:
            dry_run(journal, target, server, out)
            return 0
        backend = RestBackend(server, retry_window=args.retry_window)
        backend.workspace_id = workspace
        report = asyncio.run(_sync_and_close(journal, backend, target, out, _is_tty(out)))
    except ServerUnavailableError as exc:
        print(
            f"tracklane sync: {exc} Progress is saved: run the same command again to resume.", file=sys.stderr
        )
        return 1
    except TrackingError as exc:
        print(f"tracklane sync: {exc}", file=sys.stderr)
        return 1
    finally:
        journal.close()
    for event, reason in report.rejected[:20]:
        print(f"refused: {KIND_NAMES[event[0]]} {event[2]!r} of run {event[1]}: {reason}", file=sys.stderr)
    print(f"synced {report.runs} run(s), {report.sent} event(s) to {server.api_host}", file=out)
    return 2 if report.rejected else 0


async def _sync_and_close(
    journal: Journal, backend: RestBackend, target: str, out: TextIO, tty: bool
) -> SyncReport:
    try:
        return await sync(journal, backend, target, out=out, tty=tty)
    finally:
        await backend.aclose()


async def sync(
    journal: Journal, backend: RestBackend, target: str, *, out: TextIO, tty: bool = False
) -> SyncReport:
    """Deliver everything ``target`` has not received from ``journal`` through ``backend``.

    Raises ServerUnavailableError when the server stops answering (the progress so far is kept).
    """
    report = SyncReport()
    todo = []
    for d in await journal.call(journal.deliveries, target):
        metrics, texts = await journal.call(journal.pending_counts, d)
        if metrics or texts or d.server_run_id is None or d.wanted_state != d.state:
            todo.append(d)
            report.pending += metrics + texts
    progress = _Progress(report.pending, out, tty)
    experiments: dict[int, str] = {}

    def rejected(events: list[Event], reason: str) -> None:
        report.rejected.extend((e, reason) for e in events)
        progress.add(len(events))

    for d in todo:
        if d.server_run_id is None:
            d = await _server_run(journal, backend, target, d, experiments)
        before = report.sent

        def sent(n: int) -> None:
            report.sent += n
            progress.add(n)

        await upload_run(journal, backend, d, target, on_sent=sent, on_rejected=rejected)
        report.runs += 1
        progress.line(f"run {d.run_name or d.run_uuid} -> {d.server_run_id}: {report.sent - before} event(s)")
    progress.done()
    return report


async def _server_run(
    journal: Journal, backend: RestBackend, target: str, d: Delivery, experiments: dict[int, str]
) -> Delivery:
    """Find or create the server run of offline run ``d``, record it, return ``d`` with its id."""
    assert d.experiment is not None
    experiment_id = experiments.get(d.experiment)
    if experiment_id is None:
        local = await journal.call(journal.get_experiment, str(d.experiment))
        found = await backend.get_experiment_by_name(local.name)
        if found is None:
            try:
                experiment_id = await backend.create_experiment(local.name, local.tags)
            except ServerError as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                again = await backend.get_experiment_by_name(local.name)
                assert again is not None
                experiment_id = again.experiment_id
        elif found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"Experiment {local.name!r} is deleted on the server; restore it there, then sync again."
            )
        else:
            experiment_id = found.experiment_id
        experiments[d.experiment] = experiment_id
    reply = await backend.request(
        "POST",
        "runs/search",
        payload={
            "experiment_ids": [experiment_id],
            "filter": f"tags.`{OFFLINE_RUN_TAG}` = '{d.run_uuid}'",
            "max_results": 1,
        },
    )
    runs = reply.get("runs") or []
    if runs:
        server_run_id = str(runs[0]["info"]["run_id"])
    else:
        run = await backend.create_run(
            experiment_id, d.run_name, d.start_time or 0, {OFFLINE_RUN_TAG: d.run_uuid}
        )
        server_run_id = run.info.run_id
    await journal.call(journal.record_server_run, d.run, target, server_run_id)
    return (await journal.call(journal.deliveries, target, [d.run_uuid]))[0]


def dry_run(journal: Journal, target: str, server: ServerConfig, out: TextIO) -> None:
    """Print what a sync to ``target`` would send, contacting nothing."""
    total = 0
    for d in journal.deliveries(target):
        metrics, texts = journal.pending_counts(d)
        state = d.wanted_state != d.state and d.status is not None
        if not (metrics or texts or state or d.server_run_id is None):
            continue
        total += metrics + texts
        if d.server_run_id is None:
            experiment = journal.get_experiment(str(d.experiment)).name
            where = f"new run {d.run_name!r} in experiment {experiment!r}"
        else:
            where = f"run {d.run_name or d.run_uuid} ({d.server_run_id})"
        end = f", then status {d.status}" if state else ""
        print(f"would send to {where}: {metrics} metric point(s), {texts} param(s)/tag(s){end}", file=out)
    others = [o for o in journal.origins() if o != target]
    for origin in others:
        print(
            f"(runs spilled from {origin} are not for this server; sync them with --to that server)", file=out
        )
    print(f"dry run: {total} event(s) would be sent to {server.api_host}", file=out)


class _Progress:
    """A progress bar on a terminal, one plain line per run otherwise (logs, CI)."""

    def __init__(self, total: int, out: TextIO, tty: bool) -> None:
        self.total, self.done_n, self.out, self.tty = total, 0, out, tty
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done_n += n
        now = time.monotonic()
        if self.tty and (now - self._last > 0.1 or self.done_n >= self.total):
            self._last = now
            share = self.done_n / self.total if self.total else 1.0
            bar = "#" * int(share * 30)
            self.out.write(f"\r[{bar:<30}] {share:4.0%} {self.done_n}/{self.total} events")
            self.out.flush()

    def line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(text, file=self.out, flush=True)

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


def _is_tty(out: TextIO) -> bool:
    return hasattr(out, "isatty") and out.isatty() and os.environ.get("TERM") != "dumb"
