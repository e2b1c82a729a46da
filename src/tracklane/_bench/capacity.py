"""The capacity plan: how fast N processes of one job log into one run on the user's own server.

Self-contained, so it runs from an installed wheel against ``--api-host``: N processes log into one
run, side by side with the raw ``runs/log-batch`` ceiling of N senders that bypass tracklane, and
each rank's cost per call. The processes run ``capacity_worker`` of the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._cli.args import positive_int
from .._cli.mlflow_server import stop_process, tail
from .._exceptions import ConfigurationError, TrackingError
from .._settings import EngineConfig, ServerConfig, resolve_server, strip_credentials
from .report import machine_info, server_version, versions
from .server import measured_server
from .targets import fmt

#: Metric points each process logs, and the process counts measured, unless told otherwise.
CAPACITY_EVENTS = 50_000
CAPACITY_PROCESSES = "1,2,4"
#: Metrics per pre-encoded request of the ceiling: the most ``runs/log-batch`` takes
#: (``MAX_METRICS_PER_BATCH``, mlflow/utils/validation.py), as many as tracklane's own batches hold.
CEILING_BATCH = 1000
#: Requests each ceiling process keeps in flight: as many as tracklane's worker keeps at most, so
#: that the ceiling asks the server as much at once as tracklane may.
CEILING_IN_FLIGHT = EngineConfig().max_in_flight
#: log_metric calls timed together: reading the clock around each call would cost more than the call.
CALL_GROUP = 100
#: tracklane's aggregate events/s, as a share of the ceiling's, that the capacity plan aims for.
CEILING_GOAL = 0.9
#: Longest a process may take to start, import tracklane and reach its run (seconds).
STARTUP_TIMEOUT = 120.0
DEFAULT_EXPERIMENT = "tracklane-bench-capacity"
#: Set for each process as a launcher (torchrun) sets them, or not at all: never the caller's own.
_JOB_ENV = ("OIP_WORKLOAD_ACCESS_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MLFLOW_RUN_ID")


def process_counts(text: str) -> list[int]:
    """``--processes``: comma-separated whole numbers greater than zero (``1,2,4``), each once."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names no process count; give e.g. 1,2,4")
    return list(dict.fromkeys(positive_int(part) for part in parts))


def rest_target(server: ServerConfig, workspace_id: str | None) -> tuple[str, dict[str, str]]:
    """The REST root and the headers of a plain MLflow REST call to ``server``, without tracklane.

    The same headers tracklane's REST store sends: the ceiling must ask what tracklane asks.
    """
    headers = {"Content-Type": "application/json"}
    if server.api_key is not None:
        headers["Authorization"] = f"Bearer {server.api_key.reveal()}"
    if server.workload_id:
        headers["OIP-Workload-Id"] = server.workload_id
    return server.rest_base(workspace_id), headers


@dataclass
class Phase:
    """One measurement: ``processes`` processes of one kind (tracklane or ceiling) into one run."""

    kind: str
    processes: int
    run_id: str | None = None
    events_per_s: float | None = None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class _Rank:
    """One process of a measurement, driven over its stdin and stdout, one JSON object a line.

    It runs ``capacity_worker`` of the installed package (``python -c``), so nothing of a source
    checkout is needed. Its stderr goes to ``log``, quoted when it fails.
    """

    def __init__(self, rank: int, spec: Mapping[str, Any], env: Mapping[str, str], workdir: Path) -> None:
        self.rank = rank
        self.log = workdir / f"{spec['mode']}-n{spec['world']}-rank{rank}.log"
        code = "from tracklane._bench.capacity import capacity_worker; capacity_worker()"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=dict(env),
                cwd=workdir,
                start_new_session=True,
            )
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, name=f"bench-rank-{rank}", daemon=True).start()
        self.send(spec)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # its output ended: it exited

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError(self._gone()) from None

    def receive(self, deadline: float) -> dict[str, Any]:
        """Its next answer; raise with its log if it exits, reports an error or misses ``deadline``."""
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(
                f"rank {self.rank} gave no answer in time. Its log:\n{tail(self.log)}"
            ) from None
        if not line:
            raise RuntimeError(self._gone())
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"rank {self.rank}: {message['error']}\nIts log:\n{tail(self.log)}")
        return message

    def _gone(self) -> str:
        try:
            code: int | str = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = "nothing (still running)"
        return f"rank {self.rank} exited with {code}. Its log:\n{tail(self.log)}"

    def stop(self, timeout: float) -> None:
        """Close its stdin (a rank still waiting to start leaves), wait, then end its group."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


class CapacityPlan:
    """For each N: tracklane's aggregate events/s with N processes logging into one run, beside
    the raw ``runs/log-batch`` ceiling of N processes posting the same points without tracklane.

    The processes are the ranks of a job on one node, with the environment torchrun sets; each
    logs ``events`` points of a key of its own (``rank<r>/loss``, through ``rank_logging=
    "prefixed"``): rank 0 creates the run, the others attach to it by id. tracklane's clock runs
    from the first process's first call until the last process's ``close()`` returned, when the
    server holds everything.
    """

    def __init__(
        self,
        server: ServerConfig,
        *,
        workspace_id: str | None,
        experiment: str,
        events: int,
        timeout: float,
        workdir: Path,
    ) -> None:
        self.server = server
        self.workspace_id = workspace_id
        self.experiment = experiment
        self.events = events
        self.timeout = timeout
        self.workdir = workdir
        self.base, self.headers = rest_target(server, workspace_id)
        self.tag = uuid.uuid4().hex[:6]
        # The processes read the key where tracklane reads it; it never goes on a command line.
        self.env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
        if server.api_key is not None:
            self.env["OIP_WORKLOAD_ACCESS_KEY"] = server.api_key.reveal()

    def run(self, counts: Sequence[int], repeats: int) -> list[dict[str, Any]]:
        """Measure every N of ``counts``, ``repeats`` times in turn; a row per N."""
        experiment_id = self._experiment()
        phases: dict[int, list[Phase]] = {n: [] for n in counts}
        for repeat in range(repeats):
            for n in counts:
                suffix = f"n{n}-{self.tag}" + (f"-{repeat + 1}" if repeats > 1 else "")
                phases[n].append(self._phase("tracklane", n, None, f"tracklane-{suffix}"))
                phases[n].append(self._ceiling(n, experiment_id, f"ceiling-{suffix}"))
        return [capacity_row(n, found, self.events) for n, found in phases.items()]

    def _experiment(self) -> str:
        """The experiment's id, created through tracklane (on OICM, in the workspace) if new."""
        from tracklane import TrackingClient

        key = self.server.api_key.reveal() if self.server.api_key is not None else ""
        storage = self.workdir / "journal-setup"
        with TrackingClient(
            api_host=self.server.api_host, api_key=key, offline_mode=False, path_to_storage=str(storage)
        ) as tc:
            try:
                return tc.set_experiment(self.experiment, self.workspace_id).experiment_id
            except TrackingError as exc:
                raise SystemExit(f"tracklane bench: {exc}") from None

    def _ceiling(self, n: int, experiment_id: str, run_name: str) -> Phase:
        try:
            created = self._rest(
                "runs/create",
                {"experiment_id": experiment_id, "run_name": run_name, "start_time": time.time_ns() // 10**6},
            )
        except RuntimeError as exc:
            return Phase("ceiling", n, error=str(exc))
        run_id = str(created["run"]["info"]["run_id"])
        phase = self._phase("ceiling", n, run_id, run_name)
        with contextlib.suppress(RuntimeError):
            self._rest(
                "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": time.time_ns() // 10**6}
            )
        return phase

    def _phase(self, kind: str, n: int, run_id: str | None, run_name: str) -> Phase:
        print(f"  N={n} {kind} ...", end="", flush=True)
        phase = Phase(kind, n, run_id)
        ranks: list[_Rank] = []
        try:
            ranks.append(self._start(kind, 0, n, run_id, run_name))
            phase.run_id = str(ranks[0].receive(time.monotonic() + STARTUP_TIMEOUT)["run_id"])
            for r in range(1, n):  # one at a time: a failed start leaves the others in `ranks`
                ranks.append(self._start(kind, r, n, phase.run_id, run_name))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            for rank in ranks[1:]:
                rank.receive(deadline)
            for rank in ranks:  # all ready: start them as close together as a loop can
                rank.send({"go": True})
            deadline = time.monotonic() + self.timeout
            phase.ranks = [rank.receive(deadline) for rank in ranks]
        except RuntimeError as exc:
            phase.error = str(exc)
        finally:
            for rank in ranks:
                rank.stop(30.0)
        if phase.error is None:
            elapsed = max(r["ended"] for r in phase.ranks) - min(r["began"] for r in phase.ranks)
            phase.events_per_s = n * self.events / elapsed
            print(f" {fmt(phase.events_per_s)} events/s", flush=True)
        else:
            print(f" FAILED: {phase.error.splitlines()[0]}", flush=True)
        return phase

    def _start(self, kind: str, rank: int, n: int, run_id: str | None, run_name: str) -> _Rank:
        storage = self.workdir / f"journal-{kind}-n{n}-{self.tag}-rank{rank}"
        storage.mkdir(parents=True, exist_ok=True)
        spec = {
            "mode": kind,
            "rank": rank,
            "world": n,
            "url": self.server.api_host,
            "workspace_id": self.workspace_id,
            "experiment": self.experiment,
            "run_id": run_id,
            "run_name": run_name,
            "events": self.events,
            "in_flight": CEILING_IN_FLIGHT,
            "timeout": self.timeout,
            "storage": str(storage),
        }
        # One node's job as torchrun starts it: rank 0 creates and ends the run, the others never end it.
        env = {**self.env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n)}
        return _Rank(rank, spec, env, self.workdir)

    def _rest(self, endpoint: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base}/{endpoint}", data=json.dumps(payload).encode(), headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{endpoint}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"{endpoint}: {exc}") from None
        found: dict[str, Any] = json.loads(body or b"{}")
        return found


def capacity_row(n: int, phases: Sequence[Phase], events: int) -> dict[str, Any]:
    """One row of the table: medians over repeats, each rank's caller cost, what went wrong."""
    tracklane = [p for p in phases if p.kind == "tracklane"]
    ceiling = [p for p in phases if p.kind == "ceiling"]
    tl_rates = [p.events_per_s for p in tracklane if p.events_per_s is not None]
    ce_rates = [p.events_per_s for p in ceiling if p.events_per_s is not None]
    row: dict[str, Any] = {
        "processes": n,
        "events_per_process": events,
        "tracklane_events_per_s": statistics.median(tl_rates) if tl_rates else None,
        "ceiling_events_per_s": statistics.median(ce_rates) if ce_rates else None,
        "ratio": None,
        "goal_met": None,
        "caller_us_per_rank": [],
        "runs": {"tracklane": [p.run_id for p in tracklane], "ceiling": [p.run_id for p in ceiling]},
        "errors": [f"{p.kind}: {p.error}" for p in phases if p.error],
        "notes": [],
        "measurements": [
            {"kind": p.kind, "run_id": p.run_id, "events_per_s": p.events_per_s, "ranks": p.ranks}
            for p in phases
        ],
    }
    # Each repeat measures tracklane and then the ceiling: the ratio of the pair, which the drift of a
    # shared machine between repeats moves less than it moves either rate.
    paired = [
        t.events_per_s / c.events_per_s
        for t, c in zip(tracklane, ceiling, strict=True)
        if t.events_per_s is not None and c.events_per_s
    ]
    if paired:
        row["ratio"] = statistics.median(paired)
        row["goal_met"] = row["ratio"] >= CEILING_GOAL
    per_rank: dict[int, list[float]] = {}
    for phase in tracklane:
        for rank, result in enumerate(phase.ranks):
            per_rank.setdefault(rank, []).append(float(result["call_us"]))
            stats = result.get("stats") or {}
            trouble = {k: stats.get(k, 0) for k in ("spilled", "dropped", "rejected") if stats.get(k)}
            if result.get("lost"):
                trouble["kept nowhere at close"] = result["lost"]
            if trouble:
                said = ", ".join(f"{k} {v:,.0f}" for k, v in trouble.items())
                row["notes"].append(f"N={n} rank {rank} ({phase.run_id}): {said}")
    row["caller_us_per_rank"] = [statistics.median(per_rank[r]) for r in sorted(per_rank)]
    return row


def capacity_table(report: Mapping[str, Any]) -> str:
    """The capacity plan as a markdown table, then how it was measured and on what."""
    goal = f"{CEILING_GOAL:.0%}"
    lines = [
        f"| N | tracklane events/s | ceiling events/s | tracklane / ceiling (goal >= {goal}) "
        "| caller us per log_metric, median rank (slowest) |",
        "|---:|---:|---:|---|---:|",
    ]
    errors: list[str] = []
    notes: list[str] = []
    runs: list[str] = []
    for row in report["rows"]:
        n = row["processes"]
        tl, ce, ratio = row["tracklane_events_per_s"], row["ceiling_events_per_s"], row["ratio"]
        calls = row["caller_us_per_rank"]
        verdict = "" if ratio is None else f"{ratio:.0%} ({'met' if row['goal_met'] else 'MISSED'})"
        caller = f"{statistics.median(calls):.2f} ({max(calls):.2f})" if calls else ""
        rates = [fmt(rate) if rate else "failed" for rate in (tl, ce)]
        lines.append(f"| {n} | {rates[0]} | {rates[1]} | {verdict} | {caller} |")
        errors += [f"N={n} {error.splitlines()[0]}" for error in row["errors"]]
        notes += row["notes"]
        ids = ", ".join(f"{kind} {' '.join(str(i) for i in found)}" for kind, found in row["runs"].items())
        runs.append(f"N={n}: {ids}")
    server = report["server"]
    machine = report["machine"]
    versions = report["versions"]
    events = f"{report['events_per_process']:,}"
    foot = [
        "",
        f"Each of N processes logs {events} points (one `log_metric` a point) into one run, started as "
        "torchrun starts a job's ranks (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`): rank 0 creates the run and "
        'ends it, the others attach with `start_run(run_id=...)`; with `rank_logging="prefixed"` each '
        "rank's `loss` is stored as `rank<r>/loss` when N > 1. tracklane events/s: N x points over the "
        "time from the first process's first call to the last process's `close()` returning "
        "(everything on the server). "
        f"Ceiling: N processes post the same points, pre-encoded as {CEILING_BATCH:,}-metric "
        "`runs/log-batch` bodies before the clock starts, straight to the server (http.client, no "
        f"tracklane), into one run, each with {CEILING_IN_FLIGHT} requests in flight as tracklane's worker "
        "keeps at most. Caller cost: each rank's median time per "
        f"call over groups of {CALL_GROUP} back-to-back `log_metric` calls while its worker delivers.",
        "",
        f"`{report['command']}`: server {server['url']} ({server['backend']}; MLflow "
        f"{server.get('version')}), {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}, tracklane {versions.get('tracklane')}; "
        f"{report['repeats']} measurement(s) per N (medians; the ratio: the median of each repeat's), "
        f"{report.get('duration_s', 0):.0f}s. The "
        "server, the database and every process share this machine's cores: on a small or busy machine "
        "compare the ratios of one run, not absolute figures across runs.",
        "",
        f"Runs in experiment {report['experiment']!r}: " + "; ".join(runs) + ".",
    ]
    if notes:
        foot += ["", "Notes:", *[f"- {line}" for line in notes]]
    if errors:
        foot += ["", "Failed:", *[f"- {line}" for line in errors]]
    return "\n".join(lines + foot)


def capacity_worker() -> None:
    """One process of the capacity plan, driven by the ``tracklane bench`` process that started it.

    Reads its orders on stdin (a JSON spec, then ``{"go": true}``) and answers on stdout, one JSON
    object a line: ready (with the run id), then its figures, or ``{"error": ...}``.
    """
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the log, not among the answers

    def send(message: Mapping[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    def go() -> bool:
        line = sys.stdin.readline()  # the parent closing stdin instead: give up
        return bool(line.strip()) and bool(json.loads(line).get("go"))

    spec = json.loads(sys.stdin.readline() or "{}")
    measure = _ceiling_rank if spec.get("mode") == "ceiling" else _tracklane_rank
    try:
        measure(spec, send, go)
    except Exception as exc:  # the parent quotes it, with this process's log
        send({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


def _tracklane_rank(
    spec: Mapping[str, Any], send: Callable[[Mapping[str, Any]], None], go: Callable[[], bool]
) -> None:
    from tracklane import TrackingClient

    events = int(spec["events"])
    tc = TrackingClient(  # in a job of N > 1 (WORLD_SIZE), "loss" is stored as rank<r>/loss
        api_host=spec["url"],
        offline_mode=False,
        path_to_storage=spec["storage"],
        exit_timeout=5.0,
        rank_logging="prefixed",
    )
    tc.set_experiment(spec["experiment"], spec["workspace_id"])
    if spec["run_id"] is None:
        run = tc.start_run(run_name=spec["run_name"], log_system_metrics=False)
    else:
        run = tc.start_run(run_id=spec["run_id"], log_system_metrics=False)
    send({"run_id": run.info.run_id})
    if not go():
        tc.close(timeout=5.0)
        return
    key = "loss"
    log_metric = tc.log_metric
    clock = time.perf_counter
    per_call: list[float] = []
    began = time.monotonic()  # system-wide: comparable with the other ranks' clocks
    for first in range(0, events, CALL_GROUP):
        last = min(first + CALL_GROUP, events)
        t0 = clock()
        for step in range(first, last):
            log_metric(key, step * 0.001, step)
        per_call.append((clock() - t0) / (last - first))
    logged = time.monotonic()
    lost = tc.close(timeout=float(spec["timeout"]))
    ended = time.monotonic()
    send(
        {
            "began": began,
            "logged": logged,
            "ended": ended,
            "call_us": statistics.median(per_call) * 1e6,
            "lost": lost,
            "stats": tc.stats(),
        }
    )


def _ceiling_rank(
    spec: Mapping[str, Any], send: Callable[[Mapping[str, Any]], None], go: Callable[[], bool]
) -> None:
    server = resolve_server(spec["url"], None)  # the key, as tracklane reads it, from the environment
    assert server is not None
    base, headers = rest_target(server, spec["workspace_id"])
    root = urlsplit(base)
    events, key, now = int(spec["events"]), f"rank{spec['rank']}/loss", time.time_ns() // 10**6
    bodies = [
        json.dumps(
            {
                "run_id": spec["run_id"],
                "metrics": [
                    {"key": key, "value": step * 0.001, "timestamp": now, "step": step}
                    for step in range(first, min(first + CEILING_BATCH, events))
                ],
            }
        ).encode()
        for first in range(0, events, CEILING_BATCH)
    ]
    kind = http.client.HTTPSConnection if root.scheme == "https" else http.client.HTTPConnection
    path, pending, lock = f"{root.path}/runs/log-batch", iter(bodies), threading.Lock()
    failures: list[Exception] = []

    def sender() -> None:  # one connection each; http.client lets go of the GIL while it waits
        connection = kind(root.netloc, timeout=float(spec["timeout"]))
        try:
            while not failures:
                with lock:
                    body = next(pending, None)
                if body is None:
                    return
                _post(connection, path, body, headers)
        except Exception as exc:
            failures.append(exc)
        finally:
            connection.close()

    senders = [threading.Thread(target=sender) for _ in range(int(spec["in_flight"]))]
    send({"run_id": spec["run_id"]})
    if not go():
        return
    began = time.monotonic()
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    ended = time.monotonic()
    if failures:
        raise failures[0]
    send({"began": began, "ended": ended})


def _post(connection: http.client.HTTPConnection, path: str, body: bytes, headers: Mapping[str, str]) -> None:
    """POST on a kept-alive connection; once more on a new one if the server had closed it idle."""
    for attempt in (1, 2):
        try:
            connection.request("POST", path, body=body, headers=dict(headers))
            reply = connection.getresponse()
            answer = reply.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            connection.close()
            if attempt == 2:
                raise
            continue
        if reply.status != 200:
            raise RuntimeError(f"runs/log-batch answered HTTP {reply.status}: {answer[:300]!r}")
        return


def run_capacity(args: argparse.Namespace) -> int:
    """The capacity plan against ``--api-host`` (or a server started here); the table on stdout."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": _command_line(args),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "events_per_process": args.events,
        "repeats": args.repeats,
        "experiment": args.experiment,
    }
    with (
        tempfile.TemporaryDirectory(prefix="tracklane-bench-") as tmp,
        measured_server(args.api_host, Path(tmp)) as found,
    ):
        url, backend = found
        try:
            # An explicit --api-key, else $OIP_WORKLOAD_ACCESS_KEY, read the way the client reads it;
            # a server started here needs none.
            server = resolve_server(url, args.api_key if args.api_host else "")
        except ConfigurationError as exc:
            raise SystemExit(f"tracklane bench: {exc}") from None
        assert server is not None
        report["server"] = {
            "url": _shown(server.api_host),
            "backend": backend,
            "started_by_bench": args.api_host is None,
            "version": server_version(url),
        }
        print(
            f"tracklane bench: capacity plan against {report['server']['url']} ({backend}), "
            f"N = {', '.join(map(str, args.processes))}, {args.events:,} points per process",
            flush=True,
        )
        plan = CapacityPlan(
            server,
            workspace_id=args.workspace_id,
            experiment=args.experiment,
            events=args.events,
            timeout=args.timeout,
            workdir=Path(tmp),
        )
        report["rows"] = plan.run(args.processes, args.repeats)
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["table"] = table = capacity_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table)
    if args.out is not None:
        print(f"\nWrote {args.out}.")
    return 1 if any(row["errors"] for row in report["rows"]) else 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as run, for the report: every option but the key, and no host's credentials."""
    parts = ["tracklane bench"]
    if args.api_host:
        parts.append(f"--api-host {_shown(args.api_host)}")
    if args.workspace_id:
        parts.append(f"--workspace-id {args.workspace_id}")
    parts.append(f"--processes {','.join(map(str, args.processes))}")
    if args.events != CAPACITY_EVENTS:
        parts.append(f"--events {args.events}")
    if args.repeats != 1:
        parts.append(f"--repeats {args.repeats}")
    return " ".join(parts)


def _shown(url: str) -> str:
    """``url`` without any user:password part, fit to print."""
    return strip_credentials(url)[0].rstrip("/")
