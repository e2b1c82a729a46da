"""The server run of an offline run: found if an earlier upload made it, else created, once.

Used by ``tracklane sync`` (and ``tracklane ui``, which syncs the same way) and by any client that
replays a journal's offline runs. A server run made from an offline run carries the tag
``OFFLINE_RUN_TAG`` (the offline run's id); it is looked for before the first try, and
``RestBackend.create_run`` looks for it again before every retry, so neither an upload that died
between creating the run and recording it nor a ``runs/create`` whose reply was lost ever makes a
second run.
"""

from __future__ import annotations

from .._exceptions import ServerError, TrackingError
from .._stores.journal import Delivery, Journal
from .._stores.rest import RestBackend

#: Tag put on a server run created from an offline run: the offline run's id.
OFFLINE_RUN_TAG = "tracklane.offline_run_id"


async def server_experiment(journal: Journal, backend: RestBackend, local_id: int) -> str:
    """The server's id of the journal's experiment ``local_id``, found by name or created.

    Raises TrackingError when the experiment is deleted on the server (its name stays taken)."""
    local = await journal.call(journal.get_experiment, str(local_id))
    found = await backend.get_experiment_by_name(local.name)
    if found is None:
        try:
            return await backend.create_experiment(local.name, local.tags)
        except ServerError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = await backend.get_experiment_by_name(local.name)  # created meanwhile elsewhere
        if found is None:
            raise TrackingError(f"Experiment {local.name!r} exists on the server but cannot be read back.")
    if found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"Experiment {local.name!r} is deleted on the server; restore it there, then sync again."
        )
    return found.experiment_id


async def find_or_create_run(
    journal: Journal, backend: RestBackend, target: str, d: Delivery, experiments: dict[int, str]
) -> Delivery:
    """Find or create the server run of offline run ``d`` on ``target``, record it in the
    journal, and return ``d`` with its server id. ``experiments`` caches journal experiment ids
    to server ones across calls."""
    assert d.experiment is not None
    experiment_id = experiments.get(d.experiment)
    if experiment_id is None:
        experiment_id = experiments[d.experiment] = await server_experiment(journal, backend, d.experiment)
    found = await backend.find_run_by_tag(experiment_id, OFFLINE_RUN_TAG, d.run_uuid)
    if found is not None:
        server_run_id = str(found["info"]["run_id"])
    else:
        run = await backend.create_run(
            experiment_id, d.run_name, d.start_time or 0, {}, identity=(OFFLINE_RUN_TAG, d.run_uuid)
        )
        server_run_id = run.info.run_id
    await journal.call(journal.record_server_run, d.run, target, server_run_id)
    return (await journal.call(journal.deliveries, target, [d.run_uuid]))[0]
