"""Counts are true: ``stats()["delivered"]`` counts what the server accepted, and a server that lost
the run (it came back with an empty database) gets the refused events reported as DeliveryError
with their count, both for events sent from memory and for events kept in the journal meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tracklane import DeliveryError, TrackingClient

from servers import MlflowServer, Reader

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_a_server_that_lost_the_run_reports_every_refused_event_and_counts_only_what_it_took(
    restartable_server: MlflowServer, tmp_path: Path
) -> None:
    tc = TrackingClient(api_host=restartable_server.url, path_to_storage=str(tmp_path), retry_window=2.0)
    tc.set_experiment("lost-run")
    run_id = tc.start_run(log_system_metrics=False).info.run_id
    for step in range(2_000):
        tc.log_metric("loss", float(step), step=step)
    assert tc.flush(60)
    assert [s for _, s, _ in Reader(restartable_server.url).history(run_id, "loss")] == list(range(2_000))

    restartable_server.stop()
    for step in range(2_000, 5_000):  # while it is down: these go to the journal
        tc.log_metric("loss", float(step), step=step)
    deadline = time.monotonic() + 60
    while tc.stats()["spilled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tc.stats()["spilled"] > 0
    Path(restartable_server.backend_store_uri.removeprefix("sqlite:///")).unlink()  # an empty database
    restartable_server.start()
    for step in range(5_000, 7_000):  # after it is back: sent from memory, to a run it no longer has
        tc.log_metric("loss", float(step), step=step)

    with pytest.raises(DeliveryError) as caught:
        tc.end_run()
    stats = tc.stats()
    tc.close()

    assert len(caught.value.rejected) == 5_000 and "5000" in str(caught.value)
    assert {r.key for r in caught.value.rejected} == {"loss"}
    assert (stats["delivered"], stats["rejected"], stats["spilled"]) == (2_000, 5_000, 0)
