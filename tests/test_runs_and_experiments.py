"""The OICM TrackingClient's rules for experiments and runs, checked against a real server."""

from __future__ import annotations

import logging
import re

import pytest

from tracklane import (
    InvalidInputError,
    NoActiveRunError,
    NotFoundError,
    TrackingClient,
    TrackingError,
)

from servers import Reader


def test_set_experiment_creates_a_missing_experiment(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=server_url) as tc:
        experiment = tc.set_experiment(experiment_name)

    stored = reader.experiment(experiment_name)
    assert stored is not None and stored["experiment_id"] == experiment.experiment_id
    assert experiment.lifecycle_stage == "active"


def test_set_experiment_while_a_run_is_active_raises(client: TrackingClient, experiment_name: str) -> None:
    with client.start_run(), pytest.raises(TrackingError, match="still active"):
        client.set_experiment(experiment_name + "-other")


def test_set_experiment_on_a_deleted_experiment_says_so(server_url: str, experiment_name: str) -> None:
    with TrackingClient(api_host=server_url) as tc:
        experiment = tc.create_experiment(experiment_name)
        tc.delete_experiment(experiment.experiment_id)
        assert tc.get_experiment_by_name(experiment_name).lifecycle_stage == "deleted"  # type: ignore[union-attr]
        with pytest.raises(TrackingError, match="is deleted"):
            tc.set_experiment(experiment_name)


def test_switching_experiments_puts_runs_in_the_selected_one(
    server_url: str, experiment_name: str, reader: Reader
) -> None:
    with TrackingClient(api_host=server_url) as tc:
        tc.set_experiment(experiment_name + "-a")
        with tc.start_run(run_name="run_in_a"):
            tc.log_metric("m1", 1.0)
        tc.set_experiment(experiment_name + "-b")
        with tc.start_run(run_name="run_in_b"):
            tc.log_metric("m1", 2.0)

    for suffix, name in (("-a", "run_in_a"), ("-b", "run_in_b")):
        runs = reader.runs(reader.experiment(experiment_name + suffix)["experiment_id"])  # type: ignore[index]
        assert [r["info"]["run_name"] for r in runs] == [name]


def test_start_run_without_a_name_gets_run_dash_8_hex(client: TrackingClient) -> None:
    with client.start_run() as run:
        assert re.fullmatch(r"run-[0-9a-f]{8}", run.info.run_name)


def test_start_run_with_an_existing_name_continues_that_run(client: TrackingClient, reader: Reader) -> None:
    with client.start_run(run_name="resumable") as first:
        client.log_metric("loss", 1.0, step=0)
    with client.start_run(run_name="resumable") as second:
        client.log_metric("loss", 0.5, step=1)

    assert second.info.run_id == first.info.run_id
    assert [p[:2] for p in reader.history(first.info.run_id, "loss")] == [(1.0, 0), (0.5, 1)]
    assert reader.run(first.info.run_id)["info"]["status"] == "FINISHED"


def test_start_run_with_a_new_name_creates_a_run(client: TrackingClient, reader: Reader) -> None:
    with client.start_run(run_name="fresh") as run:
        pass
    assert reader.run(run.info.run_id)["info"]["run_name"] == "fresh"


def test_start_run_by_name_matching_several_runs_warns_and_takes_the_first_listed(
    client: TrackingClient, reader: Reader, experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    experiment_id = reader.experiment(experiment_name)["experiment_id"]  # type: ignore[index]
    for start_time in (1, 2):  # two runs with one name, made directly through the REST API
        reader.call(
            "POST",
            "runs/create",
            {"experiment_id": experiment_id, "run_name": "twin", "start_time": start_time},
        )
    listed_first = reader.call(
        "POST", "runs/search", {"experiment_ids": [experiment_id], "filter": "attributes.run_name = 'twin'"}
    )["runs"][0]["info"]["run_id"]

    with caplog.at_level(logging.WARNING, logger="tracklane"), client.start_run(run_name="twin") as run:
        pass

    assert run.info.run_id == listed_first
    assert "2 runs named 'twin'" in caplog.text


def test_start_run_by_id_attaches_to_that_run(
    server_url: str, experiment_name: str, client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(run_name="original") as original:
        client.log_param("p", "1")

    with (
        TrackingClient(api_host=server_url) as other,
        other.start_run(run_id=original.info.run_id) as attached,
    ):
        other.log_metric("later", 3.0)

    assert attached.info.run_id == original.info.run_id
    assert reader.history(original.info.run_id, "later")[0][0] == 3.0


def test_start_run_with_an_unknown_id_raises_not_found(client: TrackingClient) -> None:
    with pytest.raises(NotFoundError, match="no run with id"):
        client.start_run(run_id="0" * 32)
    assert client.active_run() is None


def test_run_id_takes_precedence_over_run_name_with_a_warning(
    client: TrackingClient, caplog: pytest.LogCaptureFixture
) -> None:
    with client.start_run(run_name="by-id") as original:
        pass
    with (
        caplog.at_level(logging.WARNING, logger="tracklane"),
        client.start_run(run_id=original.info.run_id, run_name="ignored") as run,
    ):
        pass
    assert run.info.run_id == original.info.run_id
    assert "ignoring run_name 'ignored'" in caplog.text


def test_tags_given_when_resuming_are_merged_without_duplicates(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(run_name="tagged", tags=["baseline", "sklearn"]) as run:
        pass
    with client.start_run(run_name="tagged", tags=["sklearn", "candidate"]):
        client.set_run_tags(["candidate", "reviewed"])

    tags = reader.tags(run.info.run_id)
    user_tags = sorted(k for k, v in tags.items() if v == "_OI_USER_TAG")
    assert user_tags == ["baseline", "candidate", "reviewed", "sklearn"]


def test_experiment_tags_are_added_without_duplicates(client: TrackingClient, experiment_name: str) -> None:
    client.set_experiment_tags(["benchmark", "regression"])
    client.set_experiment_tags(["regression", "customer-demo"])

    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    assert {k for k, v in experiment.tags.items() if v == "_OI_USER_TAG"} == {
        "benchmark",
        "regression",
        "customer-demo",
    }


def test_create_experiment_returns_the_existing_one_and_adds_tags(
    server_url: str, experiment_name: str
) -> None:
    with TrackingClient(api_host=server_url) as tc:
        first = tc.create_experiment(experiment_name, tags=["a"])
        again = tc.create_experiment(experiment_name, tags=["a", "b"])
    assert again.experiment_id == first.experiment_id
    assert set(again.tags) >= {"a", "b"}


def test_set_experiment_tags_without_an_experiment_raises(server_url: str) -> None:
    with TrackingClient(api_host=server_url) as tc, pytest.raises(TrackingError, match="set_experiment"):
        tc.set_experiment_tags(["x"])


def test_logging_without_an_active_run_raises_at_the_call(client: TrackingClient) -> None:
    with pytest.raises(NoActiveRunError, match="start_run"):
        client.log_metric("loss", 1.0)
    with pytest.raises(NoActiveRunError):
        client.set_run_tags(["x"])


def test_with_block_ends_the_run_failed_on_an_exception(client: TrackingClient, reader: Reader) -> None:
    with pytest.raises(ZeroDivisionError), client.start_run() as run:
        client.log_metric("before", 1.0)
        1 / 0
    stored = reader.run(run.info.run_id)
    assert stored["info"]["status"] == "FAILED"
    assert reader.history(run.info.run_id, "before")


def test_with_block_ends_the_run_killed_on_keyboard_interrupt(client: TrackingClient, reader: Reader) -> None:
    with pytest.raises(KeyboardInterrupt), client.start_run() as run:
        raise KeyboardInterrupt
    assert reader.run(run.info.run_id)["info"]["status"] == "KILLED"


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_end_run_sets_the_status_and_an_end_time(client: TrackingClient, reader: Reader, status: str) -> None:
    run = client.start_run()
    client.end_run(status=status)
    info = reader.run(run.info.run_id)["info"]
    assert info["status"] == status and info["end_time"] >= info["start_time"]


def test_end_run_with_an_unknown_status_raises(client: TrackingClient) -> None:
    with client.start_run(), pytest.raises(InvalidInputError, match="FINISHED"):
        client.end_run(status="DONE")


def test_end_run_without_an_active_run_does_nothing(client: TrackingClient) -> None:
    client.end_run()
    assert client.active_run() is None


def test_active_run_and_last_active_run(client: TrackingClient) -> None:
    assert client.active_run() is None and client.last_active_run() is None
    with client.start_run(run_name="current") as run:
        active = client.active_run()
        assert active is not None and active.info.run_id == run.info.run_id
    assert client.active_run() is None
    last = client.last_active_run()
    assert last is not None and last.info.run_id == run.info.run_id and last.info.status == "FINISHED"


def test_get_run_of_an_unknown_id_raises_not_found(client: TrackingClient) -> None:
    with pytest.raises(NotFoundError):
        client.get_run("f" * 32)


def test_get_experiment_by_name_of_a_missing_experiment_is_none(client: TrackingClient) -> None:
    assert client.get_experiment_by_name("no-such-experiment-anywhere") is None


def test_tags_as_a_dict_are_mlflows_key_values_and_a_list_is_oicms_names(
    client: TrackingClient, reader: Reader
) -> None:
    with client.start_run(run_name="dict-tags", tags={"team": "nlp"}) as run:
        client.set_run_tags(["baseline"])
        client.set_run_tags({"stage": "dev"})

    tags = reader.tags(run.info.run_id)
    assert tags["team"] == "nlp"
    assert tags["baseline"] == "_OI_USER_TAG"
    assert tags["stage"] == "dev"


def test_a_new_run_carries_mlflows_user_and_source_tags(client: TrackingClient, reader: Reader) -> None:
    with client.start_run(run_name="with-metadata") as run:
        pass

    tags = reader.tags(run.info.run_id)
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert reader.run(run.info.run_id)["info"]["user_id"] == tags["mlflow.user"]


def test_a_resumed_run_is_returned_running_with_the_tags_just_given(client: TrackingClient) -> None:
    with client.start_run(run_name="resumed-later"):
        pass

    with client.start_run(run_name="resumed-later", tags={"attempt": "2"}) as again:
        assert again.info.status == "RUNNING" and again.info.end_time is None
        assert again.data.tags["attempt"] == "2"


def test_mlflow_client_call_shape_on_the_oicm_face_says_to_use_mlflow_client(client: TrackingClient) -> None:
    with (
        client.start_run(run_name="shape") as run,
        pytest.raises(InvalidInputError, match=r"tracklane\.MlflowClient"),
    ):
        client.log_metric(run.info.run_id, "loss", 0.5)  # type: ignore[arg-type]


def test_mlflow_spellings_on_the_oicm_face_set_experiment_by_id_and_synchronous_logging(
    client: TrackingClient, experiment_name: str, reader: Reader
) -> None:
    created = client.create_experiment(experiment_name + "-by-id")

    assert client.set_experiment(experiment_id=created.experiment_id).name == experiment_name + "-by-id"
    with client.start_run(run_name="sync") as run:
        client.log_metric("loss", 0.25, step=7, synchronous=True)
        assert [(v, s) for v, s, _ in reader.history(run.info.run_id, "loss")] == [(0.25, 7)]
