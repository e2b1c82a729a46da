"""The suite's explicit tables, each entry with its reason: examples that cannot run here, the
repairs made to examples MLflow's own docs ship broken, and the known differences.

The test fails on a difference not listed in ``KNOWN_DIFFERENCES``, and on an entry there that no
longer differs (so the README table never claims a difference that is gone). Each entry names the
lane of issue 18 that removes it, for routing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .extract import Example

#: Examples that cannot run on this machine, and why. (Examples whose imports are not installed,
#: plotly's, are found by the harness and reported the same way.)
UNRUNNABLE: dict[str, str] = {}


@dataclass(frozen=True)
class Repair:
    """A fix to an example MLflow does not test (no ``:test:`` in its docstring) and that fails
    under MLflow itself, so that it exercises the function it documents. The same repaired text
    runs under both imports."""

    reason: str
    prelude: str = ""
    replace: tuple[tuple[str, str], ...] = ()


REPAIRS: dict[str, Repair] = {
    "MlflowClient.log_artifact#1": Repair(
        "`features` is used but never defined",
        prelude='features = "rooms, zipcode, median_price, school_rating, transport"',
    ),
    "MlflowClient.log_artifacts#1": Repair(
        "`MlflowClient` is used but never imported", prelude="from mlflow import MlflowClient"
    ),
    "MlflowClient.log_dict#1": Repair(
        "its last two calls are `mlflow.log_dict(run_id, ...)`: the client's signature, on the module",
        replace=(("mlflow.log_dict(run_id", "client.log_dict(run_id"),),
    ),
    "MlflowClient.log_figure#1": Repair(
        "`client` is used but never created",
        prelude="from mlflow import MlflowClient\nclient = MlflowClient()",
    ),
    "mlflow.log_image#3": Repair(
        "it passes a run id first: the client's signature, on the module",
        replace=(("mlflow.log_image(run.info.run_id, image,", "mlflow.log_image(image,"),),
    ),
    "seed003.basic_experiment_tracking": Repair(
        "MLflow 3.17 saves scikit-learn models with skops, which refuses a random forest's tree type "
        "unless it is trusted: the seed's example fails under MLflow itself without it",
        replace=(
            (
                'mlflow.sklearn.log_model(model, "model")',
                'mlflow.sklearn.log_model(model, "model", skops_trusted_types=["sklearn.tree._tree.Tree"])',
            ),
        ),
    ),
}


def repaired(example: Example) -> str:
    repair = REPAIRS.get(example.id)
    if repair is None:
        return example.source
    source = example.source
    for old, new in repair.replace:
        assert old in source, f"{example.id}: the repair's text {old!r} is no longer in MLflow's example"
        source = source.replace(old, new)
    return (repair.prelude + "\n" if repair.prelude else "") + source


@dataclass(frozen=True)
class Known:
    """A difference a user would accept (or one another lane is removing), for one example.

    ``aspects`` are the parts that differ ("error", "stdout", "server"); ``expect`` is text the
    diff must contain, so that another difference in the same example is not hidden by this one.
    ``sometimes``: MLflow's side depends on a race of its own, so the example may also come out the
    same; the results file records it as differing either way, so the README does not flip.
    """

    aspects: frozenset[str]
    reason: str
    lane: str
    expect: str = ""
    sometimes: bool = False


def _known(aspects: str, reason: str, lane: str, expect: str = "", sometimes: bool = False) -> Known:
    return Known(frozenset(aspects.split()), reason, lane, expect, sometimes)


# The lanes of issue 18 that remove a difference (for routing).
SUPERSET = "superset/flavors (issue 18 item 1)"
KEPT = "kept: tracklane's promise"
LENIENT = "kept: tracklane is more lenient"

_ASYNC_AT_EXIT = (
    "the example logs with `synchronous=False` just before the process exits: tracklane delivers the "
    "point; MLflow delivers it only if its async queue wins a race with interpreter shutdown, else "
    "logs 'cannot schedule new futures after interpreter shutdown' and loses it"
)
_CREATE_ID = (
    "tracklane's runs carry a `tracklane.create_id` tag (a create retried after a lost reply finds the "
    "run it made by it, instead of making a second run)"
)

KNOWN_DIFFERENCES: dict[str, Known] = {
    "mlflow.autolog#3": _known(
        "stdout",
        'the model autolog logged is stored the same, but `MlflowClient().list_artifacts(run_id, "model")` '
        "lists only the run's own artifacts: MLflow 3's also lists the files of the run's LoggedModel "
        "named `model` (tracklane's client does not look up logged models yet); and the example prints "
        "the run's tags: " + _CREATE_ID,
        SUPERSET,
        "artifacts: []",
    ),
    "MlflowClient.log_metric#1": _known("server", _ASYNC_AT_EXIT, KEPT, sometimes=True),
    "MlflowClient.log_batch#1": _known(
        "stdout server",
        _ASYNC_AT_EXIT + "; and it prints the run's tags: " + _CREATE_ID,
        KEPT,
        "tracklane.create_id",
        sometimes=True,
    ),
    **{
        example: _known("stdout", "it prints the run's tags: " + _CREATE_ID, KEPT, "tracklane.create_id")
        for example in ("MlflowClient.create_run#1", "MlflowClient.set_tag#1", "MlflowClient.search_runs#1")
    },
    "MlflowClient.delete_tag#1": _known(
        "error stdout server",
        "the example passes int tag values to `create_run`: MLflow's client fails (`TypeError: bad "
        "argument type for built-in operation`), tracklane stores them as strings, as `set_tag` does",
        LENIENT,
        "TypeError",
    ),
}

_QUEUED = (
    "enqueue and return (MLflow waits for the server unless async logging is on); `synchronous=True` "
    "waits until the server has them; errors in a value raise at the call, naming the key"
)
_ARTIFACTS = (
    "the call copies the content into the local journal and returns (no network I/O); the upload runs "
    "in the background and `end_run`/`set_terminated` wait for it; MLflow's exact bytes and file names"
)
_READS = "reads first deliver what was logged before them (read your writes)"
_PROXY = "through the server's artifact proxy, after the run's own pending uploads"

#: What the README says of a function beyond its examples: behaviour the examples cannot show
#: (timing, offline), with the status it gives the row ("same" or "differs").
NOTES: dict[str, tuple[str, str]] = {
    **{
        name: ("differs", _QUEUED)
        for name in ("log_metric", "log_metrics", "log_params", "set_tag", "set_tags")
    },
    "log_batch": ("differs", _QUEUED),
    "log_param": (
        "differs",
        _QUEUED + ". A changed value: refused at the call for runs this process logged to (with "
        "`synchronous=False`, logged as an ERROR as MLflow's queue logs it, and raised by `wait()`); "
        "otherwise the server's refusal comes with the next `flush`/`set_terminated` as `DeliveryError`",
    ),
    "start_run": (
        "same",
        "MLflow's run stack, one per thread; `tags` also takes OICM's list of names; system metrics off "
        "unless asked, as in MLflow. Differs: a forked child (a DataLoader worker) logs into its parent's "
        "run, where MLflow starts a new run per child",
    ),
    "delete_tag": ("same", "first delivers what was logged before it"),
    **{name: ("same", _READS) for name in ("get_run", "get_metric_history")},
    "set_terminated": ("same", "delivers what was logged to the run first, then ends it"),
    "search_runs": (
        "same",
        "fluent: a pandas DataFrame with MLflow's columns when pandas is installed, else a list; "
        "`MlflowClient`: a paged list with `.token`. Offline (a local tracking URI) searching, `delete_tag`, "
        "`delete_run` and restoring need a server: sync first",
    ),
    **{
        name: (
            "differs",
            "http(s) servers, MLflow's database URIs (`sqlite:///`, `postgresql://`, `mysql://`, "
            "`mssql://`: MLflow's own SQL store) and local paths (offline journal); no `databricks` "
            "or other schemes",
        )
        for name in ("get_tracking_uri", "set_tracking_uri")
    },
    **{name: ("differs", _ARTIFACTS) for name in ("log_artifact", "log_artifacts", "log_dict", "log_text")},
    **{name: ("differs", _ARTIFACTS) for name in ("log_figure", "log_image")},
    "log_table": (
        "differs",
        _ARTIFACTS + "; to a file already logged it replaces it (MLflow downloads and appends)",
    ),
    **{name: ("same", _PROXY) for name in ("list_artifacts", "download_artifacts", "get_artifact_uri")},
    "autolog": (
        "differs",
        "reached through `tracklane.mlflow` (or `mlflow.autolog()` with "
        '`mlflow.set_tracking_uri("tracklane+http://...")`): what it logs goes through tracklane\'s engine',
    ),
}
