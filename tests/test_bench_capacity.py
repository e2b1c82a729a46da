"""``tracklane bench`` measures the capacity plan from anywhere, with nothing of a source checkout.

Behaviour, not speed: small counts against the session's MLflow server from a working directory
outside the checkout; the table must hold a row of numbers per process count, and the server must
hold every point each process logged, once, in the one run the processes shared (and as many from
the ceiling's senders in theirs). No figure is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import MlflowServer, OicmGateway, Reader

EVENTS = 5_000


def bench(
    *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tracklane._cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def row(table: str, n: int) -> list[str]:
    found = re.search(rf"^\| {n} \|(.*)\|$", table, re.M)
    assert found, f"no row for N={n} in:\n{table}"
    return [cell.strip() for cell in found.group(1).split("|")]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_capacity_plan_reports_each_process_count_and_the_server_holds_every_point(
    mlflow_server: MlflowServer, tmp_path: Path, experiment_name: str
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    done = bench(
        "--api-host",
        mlflow_server.url,
        "--processes",
        "1,2",
        "--events",
        str(EVENTS),
        "--experiment",
        experiment_name,
        cwd=outside,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for n in (1, 2):
        tracklane, ceiling, ratio, caller = row(done.stdout, n)
        for cell in (tracklane, ceiling):
            assert re.fullmatch(r"[\d,]+(\.\d+)?", cell), cell
        assert re.fullmatch(r"\d+% \((met|MISSED)\)", ratio), ratio
        assert re.fullmatch(r"\d+\.\d+ \(\d+\.\d+\)", caller), caller
    assert not (outside / "benchmarks").exists()

    reader = Reader(mlflow_server.url)
    experiment = reader.experiment(experiment_name)
    assert experiment is not None
    runs = {r["info"]["run_name"]: r["info"]["run_id"] for r in reader.runs(experiment["experiment_id"])}
    for n in (1, 2):
        [tracklane_run] = [run_id for name, run_id in runs.items() if name.startswith(f"tracklane-n{n}-")]
        [ceiling_run] = [run_id for name, run_id in runs.items() if name.startswith(f"ceiling-n{n}-")]
        # tracklane's ranks log `loss` with rank_logging="prefixed": per-rank keys in a job of several.
        tracklane_keys = ["loss"] if n == 1 else [f"rank{rank}/loss" for rank in range(n)]
        ceiling_keys = [f"rank{rank}/loss" for rank in range(n)]
        for run_id, keys in ((tracklane_run, tracklane_keys), (ceiling_run, ceiling_keys)):
            for key in keys:
                history = reader.history(run_id, key)
                assert [step for _, step, _ in history] == list(range(EVENTS)), (n, key, run_id)
            assert len(reader.run(run_id)["data"].get("metrics", [])) == n  # one key per rank, no other
        assert reader.run(tracklane_run)["info"]["status"] == "FINISHED"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_capacity_plan_on_oicm_sends_the_key_from_the_environment_and_never_shows_it(
    oicm_gateway: OicmGateway, tmp_path: Path, experiment_name: str
) -> None:
    env = {**os.environ, "OIP_WORKLOAD_ACCESS_KEY": oicm_gateway.token}
    args = ["--api-host", oicm_gateway.api_host, "--workspace-id", "ws-bench", "--processes", "1"]

    done = bench(*args, "--events", "2000", "--experiment", experiment_name, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.fullmatch(r"[\d,]+(\.\d+)?", row(done.stdout, 1)[1])  # the ceiling's requests got through
    assert oicm_gateway.refused == 0
    assert set(oicm_gateway.workspaces_seen) == {"ws-bench"}
    assert oicm_gateway.token not in done.stdout + done.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--processes", "0", "'0' is not greater than 0"),
        ("--processes", "1,two", "'two' is not a whole number"),
        ("--processes", ",", "names no process count"),
        ("--events", "-5", "'-5' is not greater than 0"),
        ("--timeout", "nan", "'nan' is not a finite number"),
        ("--repeats", "1.5", "'1.5' is not a whole number"),
    ],
)
def test_bench_refuses_a_count_that_makes_no_sense(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    done = bench("--api-host", "http://127.0.0.1:9", option, value, cwd=tmp_path, timeout=60)

    assert done.returncode == 2
    assert message in done.stderr, done.stderr


@pytest.mark.unit
def test_bench_on_postgres_refuses_a_given_server_as_well(tmp_path: Path) -> None:
    # The PostgreSQL launcher is the tests' own: a source checkout's script starts it, then the bench.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "capacity_postgres.py"
    cmd = [sys.executable, str(script), "--api-host", "http://127.0.0.1:9", "--processes", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert done.returncode == 2
    assert "this script starts its own" in done.stderr, done.stderr
