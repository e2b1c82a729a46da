"""``tracklane sync [PATH] [--to URL]``: upload a journal's offline runs and outage leftovers.

Offline runs get an experiment (found or created by name) and a run with their name, start time,
status and end time, on the server given with ``--to``; runs spilled during an outage go to the
server run they came from, and without ``--to`` (or ``$OIP_TRACKING_SERVER``) each goes back to
its own server. Every param, tag and metric point goes through log-batch. The journal records
each run's server id and how far delivery got, after every request, so an interrupted sync
resumes and a repeated sync sends nothing twice. A server run also carries the tag
``tracklane.offline_run_id``: if a sync dies between creating a run and recording it, or a reply to
``runs/create`` is lost, the run is found instead of made twice (``_delivery.find_or_create``).

One uploader at a time per journal and server: a sync holds the journal's ``UploadLock`` for its
server from reading what is pending to the last request, so a second sync, or a client replaying
its outage, waits for it rather than creating runs twice or reordering a tag's values.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._delivery.find_or_create import OFFLINE_RUN_TAG, find_or_create_run
from .._delivery.upload import upload_run
from .._exceptions import ConfigurationError, ServerUnavailableError, TrackingError
from .._settings import ServerConfig, env, resolve_server
from .._stores.event_log import recover
from .._stores.journal import JOURNAL_DIR, Delivery, Journal, UploadLock, journal_file, server_key
from .._stores.rest import RestBackend
from .._wire.batching import KIND_NAMES, Event
from .args import positive_float
from .progress import Progress

__all__ = ["OFFLINE_RUN_TAG", "main", "pending", "register", "sync"]

#: How often a sync waiting for another uploader checks whether it is done.
_LOCK_POLL = 0.2

HELP = "upload offline runs and outage leftovers from a local journal to a tracking server"
DESCRIPTION = """\
Upload what a local journal holds that a tracking server has not received yet.

Runs logged offline (offline_mode) go to the server given with --to. Runs kept
in the journal through an outage go back to the server run they came from;
without --to (and without $OIP_TRACKING_SERVER) each goes to the server it was
spilled from.

Delivery is recorded after every request: an interrupted sync resumes where it
stopped, and a repeated sync sends nothing twice."""
EPILOG = """\
exit status: 0 done; 1 could not finish (the message says why; run it again);
2 the server refused some rows (listed).

examples:
  tracklane sync ./runs --to http://127.0.0.1:5000
  tracklane sync ./runs            (spilled runs, each to its own server)
  tracklane sync ./runs --to URL --dry-run"""


@dataclass
class SyncReport:
    """What one sync did."""

    runs: int = 0
    sent: int = 0
    pending: int = 0
    rejected: list[tuple[Event, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Pending:
    """The runs of a journal one server has not fully received, and how many events they miss."""

    runs: list[Delivery]
    events: int


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sync",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", nargs="?", default=".", help="path_to_storage you logged to (default .), or its ml_runs"
    )
    parser.add_argument(
        "--to",
        dest="to",
        metavar="URL",
        help="tracking server URL (default $OIP_TRACKING_SERVER; without either, spilled runs go "
        "back to the server they came from)",
    )
    parser.add_argument("--api-key", help="API key (default $OIP_WORKLOAD_ACCESS_KEY)")
    parser.add_argument("--workspace-id", help="OICM workspace to create experiments in (required on OICM)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent, send nothing")
    parser.add_argument(
        "--retry-window",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long to keep retrying a server that does not answer (default 30)",
    )
    parser.set_defaults(run=main)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``tracklane sync``; the exit status: 0 done, 1 could not finish (run it again), 2 rows refused."""
    out = out or sys.stdout
    try:
        server = resolve_server(args.to, args.api_key)
        workspace = args.workspace_id or None
        if server is not None:
            _check_workspace(server, workspace)
        recover_event_logs(journal_file(args.path))
        journal = Journal(journal_file(args.path), create=False)
    except TrackingError as exc:
        _error(exc)
        return 1
    try:
        if server is None:
            return _sync_to_origins(journal, args, out)
        return _sync_to(journal, server, workspace, args, out)
    except TrackingError as exc:
        _error(exc)
        return 1
    finally:
        journal.close()


def recover_event_logs(path: Path) -> None:
    """First move what processes that died (SIGKILL, OOM) left in their event logs beside the
    journal into it (an offline client's join its runs, a server's are spilled rows): the sync
    (or ``tracklane ui``) then delivers them like any other."""
    opened: list[Journal] = []

    def open_journal() -> Journal:
        opened.append(Journal(path))
        return opened[-1]

    try:
        moved = recover(path.parent, open_journal)
    finally:
        for journal in opened:
            journal.close()
    if moved:
        print(f"Recovered {moved} event(s) from the event logs of processes that died.", file=sys.stderr)


def _sync_to(
    journal: Journal, server: ServerConfig, workspace: str | None, args: argparse.Namespace, out: TextIO
) -> int:
    """Deliver what ``server`` is owed; say so, and where to send them instead, when the journal
    only holds runs of other servers (e.g. spilled from 127.0.0.1 while ``--to`` says localhost)."""
    target = server_key(server.api_host, workspace)
    others = _other_origins(journal, target)
    if args.dry_run:
        dry_run(journal, target, server, out)
        _tell_other_origins(journal, others, sys.stderr)
        return 0
    if not pending(journal, target).runs and others:
        print(
            f"tracklane sync: nothing to send to {server.api_host}: no run in {journal.path} is "
            "waiting for it.",
            file=sys.stderr,
        )
        _tell_other_origins(journal, others, sys.stderr, asked=server.api_host)
        return 1
    code = _deliver(journal, server, workspace, target, args, out)
    _tell_other_origins(journal, others, sys.stderr)
    return code


def _sync_to_origins(journal: Journal, args: argparse.Namespace, out: TextIO) -> int:
    """No server given: deliver every spilled run to the server it came from."""
    offline = _offline_runs(journal)
    origins = journal.origins()
    if not origins and offline:
        print(
            f"tracklane sync: where to? {journal.path} holds {len(offline)} run(s) logged offline; "
            f"pass the server to upload them to: {_command(journal, '--to URL')} (or set "
            "OIP_TRACKING_SERVER).",
            file=sys.stderr,
        )
        return 1
    codes: list[int] = []
    for origin in origins:
        owed = pending(journal, origin, spilled_only=True)
        if not owed.runs:
            continue
        host, workspace = split_origin(origin)
        if args.dry_run:
            for line in _describe(journal, owed.runs):
                print(f"would send to {host}: {line}", file=out)
            continue
        try:
            server = resolve_server(host, args.api_key)
            assert server is not None
            codes.append(_deliver(journal, server, workspace, origin, args, out, spilled_only=True))
        except TrackingError as exc:
            _error(exc)
            codes.append(1)
    if not codes and not args.dry_run:
        print(f"nothing to sync: every run spilled in {journal.path} has reached its server", file=out)
    if offline:
        print(
            f"note: runs logged offline ({len(offline)} in this journal) are uploaded only where you say: "
            f"{_command(journal, '--to URL')}; runs already uploaded there are not sent again.",
            file=sys.stderr,
        )
    return 1 if 1 in codes else max(codes, default=0)


def _deliver(
    journal: Journal,
    server: ServerConfig,
    workspace: str | None,
    target: str,
    args: argparse.Namespace,
    out: TextIO,
    *,
    spilled_only: bool = False,
) -> int:
    backend = RestBackend(server, retry_window=args.retry_window)
    backend.workspace_id = workspace
    try:
        report = asyncio.run(
            _sync_and_close(journal, backend, target, out, _is_tty(out), spilled_only, args.retry_window)
        )
    except ServerUnavailableError as exc:
        print(
            f"tracklane sync: {exc} Progress is saved: run the same command again to resume.", file=sys.stderr
        )
        return 1
    for event, reason in report.rejected[:20]:
        print(f"refused: {KIND_NAMES[event[0]]} {event[2]!r} of run {event[1]}: {reason}", file=sys.stderr)
    if len(report.rejected) > 20:
        print(f"refused: ... and {len(report.rejected) - 20} more", file=sys.stderr)
    print(f"synced {report.runs} run(s), {report.sent} event(s) to {server.api_host}", file=out)
    return 2 if report.rejected else 0


async def _sync_and_close(
    journal: Journal,
    backend: RestBackend,
    target: str,
    out: TextIO,
    tty: bool,
    spilled_only: bool,
    patience: float,
) -> SyncReport:
    try:
        async with upload_lock(journal, target, spilled_only, patience, out) as held:
            if not held:
                print("the other uploader delivered everything", file=out)
                return SyncReport()
            return await sync(journal, backend, target, out=out, tty=tty, spilled_only=spilled_only)
    finally:
        await backend.aclose()


@asynccontextmanager
async def upload_lock(
    journal: Journal, target: str, spilled_only: bool, patience: float, out: TextIO
) -> AsyncIterator[bool]:
    """Hold the journal's upload lock for ``target`` (True), or give way (False) when another
    uploader holds it and delivers everything meanwhile. Waits as long as that uploader makes
    progress; raises ServerUnavailableError when it made none for ``patience`` seconds."""
    lock = UploadLock(journal.path, target)
    if not lock.acquire():
        print(
            f"another uploader (a tracklane sync, or a client replaying its outage) is delivering "
            f"{journal.path} to {target}; waiting for it",
            file=out,
            flush=True,
        )
        last = await journal.call(pending, journal, target, spilled_only)
        stalled_since = time.monotonic()
        while not lock.acquire():
            await asyncio.sleep(_LOCK_POLL)
            owed = await journal.call(pending, journal, target, spilled_only)
            if not owed.runs:
                yield False
                return
            if owed != last:
                last, stalled_since = owed, time.monotonic()
            elif time.monotonic() - stalled_since > patience:
                raise ServerUnavailableError(
                    f"Another uploader has held {lock.path} for {patience:g} s without delivering anything."
                )
    try:
        yield True
    finally:
        lock.release()


async def sync(
    journal: Journal,
    backend: RestBackend,
    target: str,
    *,
    out: TextIO,
    tty: bool = False,
    spilled_only: bool = False,
) -> SyncReport:
    """Deliver everything ``target`` has not received from ``journal`` through ``backend``; only
    spilled runs (not offline ones) with ``spilled_only``. The caller holds the upload lock.

    Raises ServerUnavailableError when the server stops answering (the progress so far is kept).
    """
    report = SyncReport()
    owed = await journal.call(pending, journal, target, spilled_only)
    report.pending = owed.events
    progress = Progress(report.pending, out, tty=tty)
    experiments: dict[int, str] = {}

    def rejected(events: list[Event], reason: str) -> None:
        report.rejected.extend((e, reason) for e in events)
        progress.add(len(events))

    for d in owed.runs:
        if d.server_run_id is None:
            d = await find_or_create_run(journal, backend, target, d, experiments)
        before = report.sent

        def sent(n: int) -> None:
            report.sent += n
            progress.add(n)

        await upload_run(journal, backend, d, target, on_sent=sent, on_rejected=rejected)
        report.runs += 1
        progress.line(f"run {d.run_name or d.run_uuid} -> {d.server_run_id}: {report.sent - before} event(s)")
    progress.done()
    return report


def pending(journal: Journal, target: str, spilled_only: bool = False) -> Pending:
    """The runs ``target`` has not fully received (rows, a server run, or the run's end)."""
    runs: list[Delivery] = []
    events = 0
    for d in journal.deliveries(target, spilled_only=spilled_only):
        metrics, texts = journal.pending_counts(d)
        if metrics or texts or d.server_run_id is None or d.wanted_state != d.state:
            runs.append(d)
            events += metrics + texts
    return Pending(runs, events)


def dry_run(journal: Journal, target: str, server: ServerConfig, out: TextIO) -> None:
    """Print what a sync to ``target`` would send, contacting nothing."""
    owed = pending(journal, target)
    for line in _describe(journal, owed.runs):
        print(f"would send to {line}", file=out)
    print(f"dry run: {owed.events} event(s) would be sent to {server.api_host}", file=out)


def _describe(journal: Journal, runs: list[Delivery]) -> Iterator[str]:
    for d in runs:
        metrics, texts = journal.pending_counts(d)
        state = d.wanted_state != d.state and d.status is not None
        if d.server_run_id is None:
            experiment = journal.get_experiment(str(d.experiment)).name
            where = f"new run {d.run_name!r} in experiment {experiment!r}"
        else:
            where = f"run {d.run_name or d.run_uuid} ({d.server_run_id})"
        end = f", then status {d.status}" if state else ""
        yield f"{where}: {metrics} metric point(s), {texts} param(s)/tag(s){end}"


def _other_origins(journal: Journal, target: str) -> list[tuple[str, Pending]]:
    """Servers other than ``target`` with spilled runs still to deliver, and what they are owed."""
    found = []
    for origin in journal.origins():
        if origin != target:
            owed = pending(journal, origin, spilled_only=True)
            if owed.runs:
                found.append((origin, owed))
    return found


def _tell_other_origins(
    journal: Journal, others: list[tuple[str, Pending]], err: TextIO, asked: str | None = None
) -> None:
    if not others:
        return
    print(
        f"{journal.path} holds runs spilled from other servers; each goes back to the server it came from:",
        file=err,
    )
    for origin, owed in others:
        host, workspace = split_origin(origin)
        option = f"--to {shlex.quote(host)}"
        if workspace:
            option += f" --workspace-id {shlex.quote(workspace)}"
        print(f"  {host}: {len(owed.runs)} run(s), {owed.events} event(s) pending", file=err)
        print(f"    {_command(journal, option)}", file=err)
    if asked is not None:
        print(
            f"If {asked} is one of these under another name, run the command shown for it; "
            f"{_command(journal, '')} (no --to) delivers every spilled run to its own server.",
            file=err,
        )


def split_origin(origin: str) -> tuple[str, str | None]:
    """(host, workspace) of a journal origin, the inverse of ``server_key``."""
    host, _, workspace = origin.partition("#workspace=")
    return host, workspace or None


def _offline_runs(journal: Journal) -> list[Delivery]:
    # Offline runs are the runs with no origin: ``deliveries`` of a server that nothing was
    # spilled from lists exactly those (an empty key never names a real server).
    return [d for d in journal.deliveries("") if d.experiment is not None]


def _command(journal: Journal, options: str) -> str:
    """``tracklane sync STORAGE OPTIONS`` for this journal, with an absolute path."""
    path = journal.path.resolve()
    storage = path.parent.parent if path.parent.name == JOURNAL_DIR else path
    return f"tracklane sync {shlex.quote(str(storage))} {options}".rstrip()


def _check_workspace(server: ServerConfig, workspace: str | None) -> None:
    if server.is_oicm and not workspace:
        raise ConfigurationError(
            f"{server.api_host} is an OICM host, where experiments live in a workspace: pass --workspace-id."
        )


def _error(exc: BaseException) -> None:
    print(f"tracklane sync: {exc}", file=sys.stderr)


def _is_tty(out: TextIO) -> bool:
    return hasattr(out, "isatty") and out.isatty() and env("TERM") != "dumb"
