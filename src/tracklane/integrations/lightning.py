"""Lightning: ``TracklaneLogger``, Lightning's ``MLFlowLogger`` on tracklane's engine.

The same constructor arguments and the same contract as ``lightning.pytorch.loggers.MLFlowLogger``
(the run created lazily on first use, ``run_id``/``experiment_id``, prefix, hyperparameters,
checkpoints as artifacts, rank zero only), but ``log_metrics`` enqueues and returns instead of
posting a request per training step (Lightning#3393), and no logging failure stops training.
One line changes::

    trainer = Trainer(logger=TracklaneLogger(experiment_name="mnist", tracking_uri="http://HOST:5000"))

Needs Lightning (``lightning.pytorch``, or the standalone ``pytorch_lightning``); imported here, not
by ``tracklane``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from argparse import Namespace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from .._end_status import end_status
from .._exceptions import InvalidInputError
from .._faces.mlflow_client import MlflowClient
from .._limits import MAX_PARAM_VALUE_LENGTH
from .._runs.metadata import RUN_NAME, run_context_tags
from .._settings import launcher_run_id, tracking_destination
from ._common import KeySanitizer, never_raises

logger = logging.getLogger("tracklane")
F = TypeVar("F", bound=Callable[..., Any])


def _lightning() -> tuple[Any, Any, Any, Any]:
    """Lightning's modules this logger builds on: ``lightning.pytorch`` if installed, else the
    standalone ``pytorch_lightning`` (with ``lightning_fabric``). Imported by name, untyped: type
    checking tracklane must not walk Lightning and torch."""
    for pl, fabric in (("lightning.pytorch", "lightning.fabric"), ("pytorch_lightning", "lightning_fabric")):
        try:
            return (
                importlib.import_module(f"{pl}.loggers.logger"),
                importlib.import_module(f"{pl}.loggers.utilities"),
                importlib.import_module(f"{pl}.utilities"),
                importlib.import_module(f"{fabric}.utilities.logger"),
            )
        except ImportError:
            continue
    raise ImportError(
        "tracklane.integrations.lightning needs Lightning: pip install 'tracklane[lightning]' "
        "(or pip install lightning)."
    )


_loggers, _logger_utils, _utilities, _fabric_logger = _lightning()
_SIGTERM: type[BaseException] = getattr(
    importlib.import_module(f"{_utilities.__name__}.exceptions"), "SIGTERMException", KeyboardInterrupt
)

#: Lightning's ``finalize`` statuses as MLFlowLogger maps them to MLflow's.
_STATUSES = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
#: What MLFlowLogger records of the checkpoint callback beside each checkpoint (``metadata.yaml``).
_CHECKPOINT_FIELDS = (
    "monitor",
    "mode",
    "save_last",
    "save_top_k",
    "save_weights_only",
    "_every_n_train_steps",
    "_every_n_val_epochs",
)


def _rank_zero_only(fn: F) -> F:
    """Lightning's ``rank_zero_only``: the method runs on global rank 0 only (a no-op elsewhere)."""
    return cast(F, _utilities.rank_zero_only(fn))


def _rank_zero_experiment(fn: F) -> F:
    """Lightning's ``rank_zero_experiment``: other ranks get a dummy that ignores every call."""
    return cast(F, _loggers.rank_zero_experiment(fn))


def run_status(status: str) -> str:
    """MLflow's terminal status for Lightning's ``finalize(status)``: success/finished -> FINISHED,
    failed -> FAILED, except KILLED while Ctrl-C or SIGTERM is unwinding the trainer (Lightning
    calls ``finalize("failed")`` inside its ``except`` block); MLflow's own names pass through."""
    mapped = _STATUSES.get(status, str(status).upper())
    if mapped == "FAILED":
        return end_status(sys.exc_info()[1], failed=True, killed_by=(_SIGTERM,))
    if mapped not in _TERMINAL:
        logger.warning("tracklane: finalize(%r) is not a run status; the run ends FINISHED.", status)
        return "FINISHED"
    return mapped


def _number(value: Any) -> float | None:
    """A metric value as a float (a 0-d tensor's item too); None for what is not a number."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)):
        return None
    item = getattr(value, "item", None)
    try:
        return float(item() if callable(item) else value)
    except (TypeError, ValueError):
        return None


_Logger: Any = _loggers.Logger


class TracklaneLogger(_Logger):  # type: ignore[misc]  # Lightning is imported untyped
    """A Lightning logger that logs to an MLflow tracking server (or offline) through tracklane.

    Takes ``MLFlowLogger``'s arguments:

    Args:
        experiment_name: the experiment of the run (created if missing).
        run_name: the new run's name (``mlflow.runName``).
        tracking_uri: an http(s) server, or a local directory to log offline to (``tracklane sync``
            uploads it). Default ``$MLFLOW_TRACKING_URI``, else ``save_dir``, else offline into
            ``./ml_runs``.
        tags: tags of the new run (beside MLflow's context tags: user, source, git commit).
        save_dir: the directory to log offline to when no tracking URI is given or set.
        log_model: ``False`` (default) no checkpoints; ``True`` the checkpoints ``ModelCheckpoint``
            kept, at the end of training (every one as saved when ``save_top_k == -1``); ``"all"``
            every checkpoint as it is saved. Stored as MLFlowLogger stores them:
            ``<checkpoint stem>/<file>.ckpt`` with ``metadata.yaml`` and ``aliases.txt`` beside it.
        prefix: put before every metric key, joined with ``LOGGER_JOIN_CHAR`` ("-").
        artifact_location: the artifact root of the experiment if this logger creates it.
        run_id: log to this existing run instead of a new one; default ``$MLFLOW_RUN_ID``.
        synchronous: True: every logging call waits until the server has its events (slow; for
            debugging). Default: enqueue and return.

    Raises ConfigurationError for a tracking URI tracklane cannot log to. Creating the run (the
    ``experiment`` property, first used as the trainer sets up) raises as MLFlowLogger does when
    the server cannot be reached or ``run_id`` does not exist; after that, logging never raises.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        save_dir: str | None = None,
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        super().__init__()
        if log_model not in (True, False, "all"):
            raise InvalidInputError(f"log_model={log_model!r}: pass False, True or 'all'.")
        self._tracking_uri = _tracking_uri(tracking_uri, save_dir)
        self._destination = tracking_destination(self._tracking_uri)  # a bad URI fails here, not mid-run
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._run_name = run_name
        self._run_id = run_id or launcher_run_id()
        self.tags = dict(tags) if tags else None
        self._log_model = log_model
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._synchronous = bool(synchronous)
        self._client: MlflowClient | None = None
        self._initialized = False
        self._sanitize = KeySanitizer()
        self._params: dict[str, str] = {}
        self._logged_model_time: dict[str, float] = {}
        self._checkpoint_callback: Any = None
        self._warned: set[str] = set()

    # -- the run, created on first use ---------------------------------------------------------------

    @property
    @_rank_zero_experiment
    def experiment(self) -> MlflowClient:
        """The tracklane ``MlflowClient`` logging to this run (MLflow's client API, explicit run ids:
        ``self.logger.experiment.log_text(self.logger.run_id, ...)``). Creates the run on first use,
        or attaches to ``run_id``."""
        if self._initialized and self._client is not None:
            return self._client
        client = self._client or MlflowClient(self._tracking_uri)
        self._client = client
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
        else:
            if self._experiment_id is None:
                self._experiment_id = self._find_or_create_experiment(client)
            tags = {**run_context_tags(), **(self.tags or {})}
            if self._run_name is not None:
                if RUN_NAME in tags:
                    logger.warning("tracklane: tag %s is replaced by run_name=%r.", RUN_NAME, self._run_name)
                tags[RUN_NAME] = self._run_name
            run = client.create_run(self._experiment_id, tags=tags, run_name=self._run_name)
            self._run_id = run.info.run_id
        self._initialized = True
        return client

    def _find_or_create_experiment(self, client: MlflowClient) -> str:
        found = client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        logger.info("tracklane: experiment %r not found; creating it.", self._experiment_name)
        return client.create_experiment(self._experiment_name, artifact_location=self._artifact_location)

    def _live(self) -> tuple[MlflowClient, str]:
        """The client and the run's id, creating the run on first use (rank zero only)."""
        client = self._client if self._initialized else None
        if client is None:
            client = self.experiment
        assert self._run_id is not None
        return client, self._run_id

    @property
    def run_id(self) -> str | None:
        """The run's id (creating the run if it does not exist yet)."""
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id (creating the run if it does not exist yet)."""
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment id, as MLFlowLogger names it (Lightning puts checkpoints under it)."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run id, as MLFlowLogger versions it."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local directory the run is logged to when offline; None when logging to a server."""
        return None if self._destination.server is not None else self._destination.storage

    # -- logging: enqueue and return ---------------------------------------------------------------

    @_rank_zero_only
    @never_raises("TracklaneLogger.log_hyperparams")
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Log hyperparameters as params, nested ones as ``a/b``, each once (a param cannot change
        value in MLflow: a changed one is skipped with a warning)."""
        flat = _fabric_logger._flatten_dict(_fabric_logger._convert_params(params))
        new: dict[str, str] = {}
        for raw_key, value in flat.items():
            key = self._sanitize(str(raw_key))
            text = str(value)[:MAX_PARAM_VALUE_LENGTH]
            before = self._params.get(key)
            if before is None:
                new[key] = self._params[key] = text
            elif before != text:
                self._warn_once(
                    f"param:{key}",
                    f"hyperparameter {key!r} changed from {before!r} to {text!r}; MLflow keeps a param's "
                    "first value, so the new one is not logged (log it as a metric or tag if it varies).",
                )
        if new:
            client, run_id = self._live()
            client.log_batch(run_id, params=list(new.items()), synchronous=self._synchronous)

    @_rank_zero_only
    @never_raises("TracklaneLogger.log_metrics")
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log this step's metrics: one enqueue, no I/O. Keys get ``prefix`` and are renamed where
        the server would refuse them; values that are not numbers are skipped."""
        client, run_id = self._live()
        sanitize, at = self._sanitize, step or 0
        batch: list[tuple[str, float, None, int]] = []
        for key, value in _fabric_logger._add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            number = _number(value)
            if number is None:
                self._warn_once(f"metric:{key}", f"metric {key!r} is not a number ({value!r}); not logged.")
                continue
            batch.append((sanitize(key), number, None, at))
        client.log_batch(run_id, metrics=batch, synchronous=self._synchronous)

    # -- checkpoints -------------------------------------------------------------------------------

    @_rank_zero_only
    @never_raises("TracklaneLogger.after_save_checkpoint")
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Keep the checkpoints ``log_model`` asks for: a local copy now, the upload in the
        background (``finalize`` waits for it)."""
        if self._log_model == "all" or (self._log_model is True and checkpoint_callback.save_top_k == -1):
            self._log_checkpoints(checkpoint_callback)
        elif self._log_model is True:
            self._checkpoint_callback = checkpoint_callback

    def _log_checkpoints(self, checkpoint_callback: Any) -> None:
        """Every checkpoint not logged yet (or rewritten since), in MLFlowLogger's layout."""
        yaml = importlib.import_module("yaml")  # Lightning's own dependency
        client, run_id = self._live()
        for mtime, path, score, _ in _logger_utils._scan_checkpoints(
            checkpoint_callback, self._logged_model_time
        ):
            stem = Path(path).stem
            metadata = {
                "score": score.item() if hasattr(score, "item") else score,
                "original_filename": Path(path).name,
                "Checkpoint": {
                    k: getattr(checkpoint_callback, k)
                    for k in _CHECKPOINT_FIELDS
                    if hasattr(checkpoint_callback, k)
                },
            }
            aliases = ["latest", "best"] if path == checkpoint_callback.best_model_path else ["latest"]
            client.log_artifact(run_id, path, stem)
            client.log_text(run_id, yaml.dump(metadata, default_flow_style=False), f"{stem}/metadata.yaml")
            client.log_text(run_id, str(aliases), f"{stem}/aliases.txt")
            self._logged_model_time[path] = mtime

    # -- the end -----------------------------------------------------------------------------------

    @_rank_zero_only
    @never_raises("TracklaneLogger.finalize")
    def finalize(self, status: str = "success") -> None:
        """Log the checkpoints kept for the end, deliver everything, and end the run: FINISHED,
        FAILED, or KILLED on Ctrl-C/SIGTERM. Bounded by the engine's own waits."""
        if not self._initialized or self._client is None or self._run_id is None:
            return
        mlflow_status = run_status(status)
        if self._checkpoint_callback is not None:
            self._log_checkpoints(self._checkpoint_callback)
        self._client.set_terminated(self._run_id, mlflow_status)

    # -- helpers -----------------------------------------------------------------------------------

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("tracklane: %s", message)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for spawned workers: the client (threads, sockets) is rebuilt there and attaches
        to the same run by id; the checkpoint callback (a weak proxy) is not carried."""
        state = self.__dict__.copy()
        state["_client"] = None
        state["_initialized"] = False
        state["_checkpoint_callback"] = None
        return state


def _tracking_uri(tracking_uri: str | None, save_dir: str | None) -> str | None:
    """MLFlowLogger's rule: the argument, else ``$MLFLOW_TRACKING_URI``, else ``save_dir`` (here the
    offline journal's directory); None leaves the choice to tracklane's settings."""
    if tracking_uri or save_dir is None:
        return tracking_uri or None
    configured = tracking_destination(None)
    default = configured.server is None and configured.uri == "file:./ml_runs"  # nothing set anywhere
    return save_dir if default else None
