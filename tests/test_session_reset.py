"""``session.reset()`` puts the MLflow faces back as a fresh interpreter has them: the tests call it
between tests instead of editing the faces' private state."""

from __future__ import annotations

from pathlib import Path

import pytest

import tracklane.mlflow as mlflow
from tracklane import MlflowClient
from tracklane._faces import session

pytestmark = pytest.mark.unit


def test_reset_shuts_the_mlflow_faces_sessions_and_forgets_the_fluent_state(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(str(tmp_path / "runs"))
    run = mlflow.start_run(run_name="before-reset")
    mlflow.log_metric("loss", 0.5)
    client = MlflowClient(str(tmp_path / "other"))
    client.create_experiment("kept-apart")
    made = [s for s in session._shared.values() if s.from_mlflow_face]
    assert len(made) == 2

    session.reset(timeout=10.0)

    assert all(s.runtime.closed for s in made)
    assert not [s for s in session._shared.values() if s.from_mlflow_face]
    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() == "file:./ml_runs"  # the default again, as after import
    # The run that was active ended with its events kept (offline: in the journal there).
    mlflow.set_tracking_uri(str(tmp_path / "runs"))
    stored = mlflow.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.metrics == {"loss": 0.5}
