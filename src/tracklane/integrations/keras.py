"""Keras 3: ``TracklaneCallback``, MLflow's ``mlflow.keras.MlflowCallback`` on tracklane's engine.

The same contract (``log_every_epoch``, ``log_every_n_steps``; the optimizer's config as
``optimizer_*`` params, the model summary as ``model_summary.txt``, epoch metrics at ``step=epoch``,
batch metrics at the optimizer's global step, ``evaluate`` metrics as ``validation_*``), but every
call only enqueues, it logs to an explicit run, and a logging failure never stops ``fit``.

Importing this module does not import Keras: the class (a ``keras.callbacks.Callback``) is built on
first access of ``TracklaneCallback``, so set ``KERAS_BACKEND`` before that, as before ``import keras``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import InvalidInputError, ServerError
from .._faces.mlflow_client import MlflowClient
from .._runs.metadata import run_context_tags
from .._settings import default_experiment, launcher_run_id, tracking_destination
from ._common import KeySanitizer, flatten_params, logger, never_raises

__all__ = ["TracklaneCallback"]  # noqa: F822 (built on first access: see __getattr__)

#: The default experiment of an MLflow server.
DEFAULT_EXPERIMENT_ID = "0"


class _TracklaneKerasLogging:
    """Log a Keras ``fit`` to a tracklane run: params and the model summary when training begins,
    metrics per epoch (``step=epoch``) or every ``log_every_n_steps`` batches (at the global step),
    ``validation_*`` metrics from a later ``model.evaluate(callbacks=[...])``.

    Which run: ``run`` (a run or active run) or ``run_id`` if given; else the active
    ``tracklane.mlflow`` run (as MLflow's callback logs to the active run), unless ``tracking_uri``
    or ``experiment_name`` is given; else ``$MLFLOW_RUN_ID``; else a new run in ``experiment_name``
    (default ``$MLFLOW_EXPERIMENT_NAME``/``_ID``, then the Default experiment). Only a run this
    callback created is ended (FINISHED) when training ends; another ``fit`` then starts a new one.

    Raises InvalidInputError for contradicting arguments (as MLflow's: ``log_every_n_steps`` needs
    ``log_every_epoch=False``), ConfigurationError for a tracking URI tracklane cannot log to.
    """

    # Supplied by keras.callbacks.Callback (set_model, set_params).
    model: Any
    params: Any
    # Only assigned when batch logging is on: Keras dispatches batch hooks asynchronously and
    # skips converting each batch's logs unless a callback overrides them.
    on_train_batch_end: Callable[..., None]

    def __init__(
        self,
        run: Any = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        log_every_epoch: bool = True,
        log_every_n_steps: int | None = None,
        run_name: str | None = None,
    ) -> None:
        super().__init__()
        if log_every_epoch and log_every_n_steps is not None:
            raise InvalidInputError(
                "log_every_n_steps must be None if log_every_epoch=True (as in MLflow's callback); "
                f"got log_every_n_steps={log_every_n_steps!r}. Pass log_every_epoch=False to log batches."
            )
        if not log_every_epoch and log_every_n_steps is None:
            raise InvalidInputError(
                "log_every_epoch=False needs log_every_n_steps, e.g. log_every_n_steps=50."
            )
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise InvalidInputError(f"log_every_n_steps must be a positive int, got {log_every_n_steps!r}.")
        given = _run_id_of(run)
        if given is not None and run_id is not None and given != run_id:
            raise InvalidInputError(f"run ({given}) and run_id ({run_id}) name different runs; pass one.")
        tracking_destination(tracking_uri)  # an unusable URI fails here, not silently in fit
        self._given_run_id = given or run_id
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._run_name = run_name
        self.log_every_epoch = log_every_epoch
        self.log_every_n_steps = log_every_n_steps
        self._keys = KeySanitizer()
        self._client: MlflowClient | None = None
        self._client_uri: str | None = None
        self._run_id: str | None = None
        self._owns_run = False  # created here: ended here
        self._training = False
        self._last_epoch = 0
        self._steps_done = 0  # optimizer steps, as MLflow's ``optimizer.iterations``
        self._epoch_base = 0
        if log_every_n_steps is not None:
            self.on_train_batch_end = self._log_batch_metrics

    @property
    def run_id(self) -> str | None:
        """The run this callback logs to (None until training begins, unless one was given)."""
        return self._run_id or self._given_run_id

    # -- Keras hooks ---------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._training = True
        self._begin_run()
        if self._run_id is None:
            return
        self._steps_done = self._epoch_base = _optimizer_steps(self.model)
        self._log_params()
        self._log_summary()

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch_base = self._steps_done

    @never_raises("Keras epoch metrics")
    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._last_epoch = epoch
        if self.log_every_epoch and logs:
            self._log_metrics(logs, epoch)

    @never_raises("Keras batch metrics")
    def _log_batch_metrics(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # ``batch`` is the last step of this call within the epoch (steps_per_execution may be > 1).
        self._steps_done = self._epoch_base + batch + 1
        n = self.log_every_n_steps
        if logs and n is not None and self._steps_done % n == 0:
            self._log_metrics(logs, self._steps_done)

    @never_raises("Keras evaluation metrics")
    def on_test_end(self, logs: Mapping[str, Any] | None = None) -> None:
        # Inside fit, validation metrics arrive with the epoch's logs as val_*; log evaluate() only.
        if self._training or not logs or self.run_id is None:
            return
        self._log_metrics({f"validation_{k}": v for k, v in logs.items()}, self._last_epoch)

    @never_raises("ending the Keras run")
    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._training = False
        if self._owns_run and self._run_id is not None and self._client is not None:
            self._owns_run = False  # ended: the next fit starts a new run
            self._client.set_terminated(self._run_id, "FINISHED")

    # -- the run -------------------------------------------------------------------------------

    @never_raises("starting the Keras run")
    def _begin_run(self) -> None:
        if self._run_id is not None and (self._owns_run or self._run_id == self._given_run_id):
            return  # a given run, or ours still running (a fit that raised): keep logging to it
        self._run_id = None
        fluent = self._fluent_run()
        if fluent is not None:
            self._client, self._run_id = fluent
        elif self._given_run_id is not None or launcher_run_id() is not None:
            self._client_for(self._tracking_uri)
            self._run_id = self._given_run_id or launcher_run_id()
        else:
            client = self._client_for(self._tracking_uri)
            run = client.create_run(
                self._experiment_id(client), tags=run_context_tags(), run_name=self._run_name
            )
            self._run_id, self._owns_run = run.info.run_id, True
            client.end_at_exit(run.info.run_id)  # a crash in fit() calls no callback

    def _fluent_run(self) -> tuple[MlflowClient, str] | None:
        """The active ``tracklane.mlflow`` run, when nothing named another (and only if the user's
        code imported that module: this never starts the fluent API)."""
        fluent = sys.modules.get("tracklane.mlflow")
        if fluent is None or self._given_run_id or self._tracking_uri or self._experiment_name:
            return None
        active = fluent.active_run()
        if active is None:
            return None
        uri = fluent.get_tracking_uri()
        # The default destination's URI does not name its journal directory: resolve it the same way.
        client = self._client_for(None if uri == tracking_destination(None).uri else uri)
        return client, str(active.info.run_id)

    def _client_for(self, uri: str | None) -> MlflowClient:
        if self._client is None or self._client_uri != uri:
            self._client, self._client_uri = MlflowClient(uri), uri
        return self._client

    def _experiment_id(self, client: MlflowClient) -> str:
        env_name, env_id = default_experiment()
        name = self._experiment_name or env_name
        if not name:
            return env_id or DEFAULT_EXPERIMENT_ID
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client.create_experiment(name)
            except ServerError:  # another process created it first
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        return found.experiment_id

    # -- what is logged ------------------------------------------------------------------------

    @never_raises("Keras params")
    def _log_params(self) -> None:
        assert self._client is not None and self._run_id is not None
        params: dict[str, Any] = {}
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            params.update(flatten_params(optimizer.get_config(), "optimizer_"))
        fit = self.params or {}
        for key, name in (("epochs", "epochs"), ("steps", "steps_per_epoch"), ("batch_size", "batch_size")):
            if fit.get(key) is not None:
                params[name] = fit[key]
        try:
            self._client.log_batch(self._run_id, params=list(self._keys.mapping(params).items()))
        except InvalidInputError as exc:  # the others were logged
            logger.warning("tracklane: some Keras params were not logged: %s", exc)

    @never_raises("the Keras model summary")
    def _log_summary(self) -> None:
        assert self._client is not None and self._run_id is not None
        lines: list[str] = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(str(line)))
        self._client.log_text(self._run_id, "\n".join(lines), "model_summary.txt")

    def _log_metrics(self, logs: Mapping[str, Any], step: int) -> None:
        if self._client is None or self._run_id is None:
            return
        metrics = []
        for key, value in logs.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue  # Keras logs only numbers; a callback may add others
            metrics.append((self._keys(key), number, None, step))
        self._client.log_batch(self._run_id, metrics=metrics)


def _optimizer_steps(model: Any) -> int:
    """Steps the model's optimizer has taken (MLflow's batch step); 0 if it cannot say."""
    try:
        return int(model.optimizer.iterations.value)  # the backend's scalar: int() of the Variable warns
    except Exception:
        return 0


def _run_id_of(run: Any) -> str | None:
    """The id of a ``Run``/``ActiveRun`` (tracklane's or MLflow's), or of a run id string."""
    if run is None or isinstance(run, str):
        return run
    try:
        return str(run.info.run_id)
    except AttributeError:
        raise InvalidInputError(f"run must be a run (with .info.run_id) or a run id, got {run!r}.") from None


_build_lock = threading.Lock()


def _build() -> type:
    """``TracklaneCallback``: the logging above on ``keras.callbacks.Callback`` (imports Keras)."""
    keras = importlib.import_module("keras")  # untyped; and not imported with this module

    with _build_lock:
        built = globals().get("TracklaneCallback")
        if built is None:
            built = type(
                "TracklaneCallback",
                (_TracklaneKerasLogging, keras.callbacks.Callback),
                {"__module__": __name__, "__qualname__": "TracklaneCallback", "__doc__": _DOC},
            )
            globals()["TracklaneCallback"] = built
        return built


_DOC = (
    (_TracklaneKerasLogging.__doc__ or "")
    + """
    Example::

        import os
        os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported
        from tracklane.integrations.keras import TracklaneCallback

        model.fit(x, y, epochs=3, callbacks=[TracklaneCallback(experiment_name="keras")])
    """
)


def __getattr__(name: str) -> Any:
    # Module __getattr__ (PEP 562): Keras is imported on first use of the class, not with this module.
    if name == "TracklaneCallback":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
