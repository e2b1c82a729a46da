"""The journal on disk: compact, exact, and shared safely by several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracklane import TrackingClient
from tracklane._cli import main as cli

from servers import Reader

WRITER = """
import sys
from tracklane import TrackingClient
storage, rank = sys.argv[1], int(sys.argv[2])
with TrackingClient(offline_mode=True, path_to_storage=storage, max_buffer=5000) as tc:
    tc.set_experiment("shared")  # both ranks race to create it
    with tc.start_run(run_name=f"rank-{rank}") as run:
        tc.log_param("rank", rank)
        for step in range(30_000):
            tc.log_metrics({"loss": step * 0.001 + rank, "lr": 0.1}, step=step)
print(run.info.run_id, flush=True)
"""


def test_two_processes_logging_offline_into_one_journal_lose_nothing(
    tmp_path: Path, server_url: str, reader: Reader, capsys: pytest.CaptureFixture[str]
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    run_ids = [out.strip() for out, _ in outputs]

    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        for rank, run_id in enumerate(run_ids):
            loss = tc.get_metric_history(run_id, "loss")
            assert [(p.step, p.value) for p in loss] == [(s, s * 0.001 + rank) for s in range(30_000)]
            assert len(tc.get_metric_history(run_id, "lr")) == 30_000
            assert tc.get_run(run_id).data.params == {"rank": str(rank)}
        experiment = tc.get_experiment_by_name("shared")
    assert experiment is not None

    # and what the journal holds reaches a server intact
    assert cli(["sync", str(tmp_path), "--to", server_url]) == 0, capsys.readouterr().err
    server_experiment = reader.experiment("shared")
    assert server_experiment is not None
    runs = {
        r["info"]["run_name"]: r["info"]["run_id"] for r in reader.runs(server_experiment["experiment_id"])
    }
    assert set(runs) == {"rank-0", "rank-1"}
    for rank in (0, 1):
        assert len(reader.history(runs[f"rank-{rank}"], "loss")) == 30_000


@pytest.mark.unit
def test_a_metric_point_takes_at_most_60_bytes_on_disk(tmp_path: Path) -> None:
    points = 100_000
    with TrackingClient(offline_mode=True, path_to_storage=str(tmp_path)) as tc:
        tc.set_experiment("size")
        with tc.start_run(run_name="r", log_system_metrics=False):
            for step in range(points // 4):
                tc.log_metrics(
                    {"train/loss": 1 / (step + 1), "train/acc": step / points, "lr": 1e-3, "x": step},
                    step=step,
                )

    on_disk = sum(p.stat().st_size for p in (tmp_path / "ml_runs").iterdir())
    assert on_disk / points <= 60, f"{on_disk / points:.1f} bytes per metric point"
