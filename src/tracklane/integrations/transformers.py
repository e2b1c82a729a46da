"""Hugging Face ``transformers``: ``TracklaneCallback``, a ``TrainerCallback`` in place of ``MLflowCallback``.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[TracklaneCallback()])

(``TrainingArguments(report_to=[])`` keeps transformers' own ``MLflowCallback`` from logging as
well.) It follows ``MLflowCallback``'s contract: on the world's process zero only, a run is created
on train begin (or ``MLFLOW_RUN_ID`` resumed, or a ``tracklane.mlflow`` run that is active logged
into), ``args.to_dict()`` and the model's config are logged as params, every ``on_log`` as metrics at
``state.global_step``, and the run ends FINISHED on train end. It honours MLflowCallback's
environment variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_TAGS``,
``MLFLOW_NESTED_RUN``, ``MLFLOW_RUN_ID``, ``MLFLOW_FLATTEN_PARAMS``, ``MLFLOW_MAX_LOG_PARAMS``,
``HF_MLFLOW_LOG_ARTIFACTS``); a constructor argument wins over its variable.

What differs: logging only enqueues (microseconds per step, no request in the training loop); a
param value over the server's 6000 characters is truncated (MLflowCallback drops it); a key the
server refuses is renamed (said once); a non-number is skipped (said once per key); and no
failure of logging ever raises into the Trainer.

How runs end. transformers calls ``on_train_end`` only when ``train()`` returns, so a run whose
training raised is ended at interpreter exit instead: FAILED (KILLED if the process dies of
Ctrl-C), before tracklane's own exit flush delivers what is left (exit hooks run last-registered
first, and the callback registers its hook after its client exists). A new ``train()`` of the same
trial (a retry after an exception was caught, ``auto_find_batch_size``) goes on logging into the
run it left open; another trial ends that run FAILED and starts its own. A SIGTERM kills the
process without exit hooks: the engine still delivers what was logged, but the run stays RUNNING.
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from .._end_status import end_status, exit_status_of_process
from .._exceptions import ConfigurationError, ServerError
from .._faces.mlflow_client import MlflowClient
from .._limits import MAX_PARAM_VALUE_LENGTH
from .._runs.metadata import PARENT_RUN_ID, run_context_tags
from .._runs.mlflow_runs import DEFAULT_EXPERIMENT_ID
from .._settings import default_experiment, env, env_bool, launcher_run_id
from ._common import KeySanitizer, flatten_params, never_raises

logger = logging.getLogger("tracklane")


class TracklaneCallback(TrainerCallback):  # type: ignore[misc]
    """Logs a ``transformers.Trainer``'s params, metrics and (when asked) output directory.

    Args:
        tracking_uri: an http(s) MLflow/OICM server or a local directory (offline, uploaded later
            with ``tracklane sync``); default ``$MLFLOW_TRACKING_URI`` (see ``MlflowClient``).
        experiment_name: created if missing; default ``$MLFLOW_EXPERIMENT_NAME``, then
            ``$MLFLOW_EXPERIMENT_ID``, then MLflow's default experiment.
        run_name: default ``args.run_name`` (a hyperparameter search's trial name for its runs).
        tags: run tags, over those of ``$MLFLOW_TAGS`` (a JSON object).
        nested: a child run per ``train()`` (per trial of a hyperparameter search), tagged
            ``mlflow.parentRunId``; default ``$MLFLOW_NESTED_RUN``. The parent is the run of
            ``run_id``/``$MLFLOW_RUN_ID``, else an active ``tracklane.mlflow`` run, else one the
            callback starts (ended by ``end_runs()`` or at exit).
        run_id: a run to resume (or, nested, to nest under); default ``$MLFLOW_RUN_ID``.
        log_artifacts: upload ``args.output_dir`` (checkpoints, saved model) as the run's artifacts
            on train end; default ``$HF_MLFLOW_LOG_ARTIFACTS``.
        flatten_params: nested dicts of the args and config as ``a.b`` params rather than one
            string; default ``$MLFLOW_FLATTEN_PARAMS``.
        max_log_params: log only the first N params; default ``$MLFLOW_MAX_LOG_PARAMS``.

    Raises ConfigurationError (from the constructor) for a variable that does not parse.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool | None = None,
        run_id: str | None = None,
        log_artifacts: bool | None = None,
        flatten_params: bool | None = None,
        max_log_params: int | None = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        name, experiment_id = default_experiment()
        self._experiment_name = experiment_name or name
        self._experiment_id = None if self._experiment_name else experiment_id
        self._run_name = run_name
        self._tags = {**_env_tags(), **dict(tags or {})}
        self._nested = nested if nested is not None else _env_flag("MLFLOW_NESTED_RUN", "nested")
        #: Resumed once, by the first run this callback starts (MLflow's start_run does the same).
        self._resume_id = run_id or launcher_run_id()
        self._log_artifacts = (
            log_artifacts
            if log_artifacts is not None
            else _env_flag("HF_MLFLOW_LOG_ARTIFACTS", "log_artifacts")
        )
        self._flatten = (
            flatten_params
            if flatten_params is not None
            else _env_flag("MLFLOW_FLATTEN_PARAMS", "flatten_params")
        )
        self._max_params = max_log_params if max_log_params is not None else _env_max_log_params()
        self._key = KeySanitizer()
        self._client: MlflowClient | None = None
        self._ends: _RunEnds | None = None
        self._run_id: str | None = None  # where metrics go (after train end too: a later evaluate())
        self._owned = False  # this callback started or resumed the run, so ends it
        self._parent_id: str | None = None
        self._parent_experiment = DEFAULT_EXPERIMENT_ID
        self._tried = False  # a run was asked for (once per train(); a failed start is not retried per step)
        self._trial: str | None = None
        self._params: dict[str, str] = {}  # the run's params: a value never changes
        self._not_numbers: set[str] = set()

    @property
    def run_id(self) -> str | None:
        """The run metrics go to (the current child when nested); None before the first."""
        return self._run_id

    @property
    def parent_run_id(self) -> str | None:
        """The parent of the nested runs; None unless ``nested``."""
        return self._parent_id

    # -- Trainer events --------------------------------------------------------------------------

    @never_raises("TracklaneCallback.on_train_begin")
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._tried = True
        ends = self._run_ends()
        if self._run_id is not None and ends.training == self._run_id and self._trial == state.trial_name:
            pass  # the same trial's train() again (a retry): go on in the run it left open
        else:
            if ends.training is not None:  # the last trial's train() raised and was caught
                self._end_run(end_status(failed=True))
            self._start_run(args, state)
        ends.training = self._run_id
        self._log_params(args, model)

    @never_raises("TracklaneCallback.on_log")
    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if self._run_id is None:
            if self._tried:  # starting failed (and said so): no server call per step
                return
            self._tried = True  # evaluate() before any train(): a run, as MLflowCallback starts one
            self._run_ends()
            self._start_run(args, state)
            self._log_params(args, kwargs.get("model"))
        assert self._client is not None and self._run_id is not None
        step = int(state.global_step)
        metrics = []
        for key, value in logs.items():
            number = _number(value)
            if number is None:
                self._skip(key, value)
            else:
                metrics.append((self._key(key), number, None, step))
        self._client.log_batch(self._run_id, metrics=metrics)

    @never_raises("TracklaneCallback.on_train_end")
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self._client is None or self._run_id is None:
            return
        if self._log_artifacts and os.path.isdir(args.output_dir):
            self._client.log_artifacts(self._run_id, args.output_dir)  # a copy now, uploaded behind
        if self._owned:
            self._end_run("FINISHED")  # delivers the run's events and artifacts first
        elif self._ends is not None and self._ends.training == self._run_id:
            self._ends.training = None

    # -- runs ------------------------------------------------------------------------------------

    def end_runs(self, status: str = "FINISHED") -> None:
        """End the runs this callback started and left open (a hyperparameter search's parent, a
        run started by ``evaluate()``), innermost first; otherwise they end at exit. Raises
        DeliveryError if the server refused some of their events."""
        if self._ends is not None:
            self._ends.end_all(status)

    def _run_ends(self) -> _RunEnds:
        """The client and the exit hook, made on first use (only process zero ever logs)."""
        if self._ends is None:
            self._client = MlflowClient(self._tracking_uri)
            self._ends = _RunEnds(self._client)  # registered after the client's engine: ends first
        return self._ends

    def _start_run(self, args: Any, state: Any) -> None:
        client, ends = self._client, self._ends
        assert client is not None and ends is not None
        self._run_id, self._trial, self._params = None, state.trial_name, {}  # nothing to the last run
        resume, self._resume_id = self._resume_id, None
        name = self._run_name or state.trial_name or args.run_name
        if self._nested:
            if self._parent_id is None:
                self._parent_id = self._parent_run(client, ends, resume, args.run_name)
                self._parent_experiment = client.get_run(self._parent_id).info.experiment_id
            self._run_id = self._create_run(client, self._parent_experiment, name, self._parent_id)
            self._owned = True
            ends.open.append(self._run_id)
        elif resume is not None:
            self._run_id = self._resume(client, resume)
            self._owned = True
            ends.open.append(self._run_id)
        elif (active := _fluent_run_id()) is not None:
            self._run_id, self._owned = active, False  # the user's run: their `with` block ends it
            self._params = dict(client.get_run(active).data.params)
        else:
            self._run_id = self._create_run(client, self._experiment(client), name, None)
            self._owned = True
            ends.open.append(self._run_id)
        if self._tags and not self._owned:
            client.log_batch(self._run_id, tags=list(self._tags.items()))

    def _parent_run(self, client: MlflowClient, ends: _RunEnds, resume: str | None, name: str | None) -> str:
        if resume is not None:
            ends.open.append(self._resume(client, resume, params=False))
            return resume
        active = _fluent_run_id()
        if active is not None:
            return active
        parent = self._create_run(client, self._experiment(client), name, None)
        ends.open.append(parent)
        return parent

    def _create_run(
        self, client: MlflowClient, experiment_id: str, name: str | None, parent: str | None
    ) -> str:
        tags = {**run_context_tags(), **self._tags}
        if parent is not None:
            tags[PARENT_RUN_ID] = parent
        return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    def _resume(self, client: MlflowClient, run_id: str, params: bool = True) -> str:
        """MLflow's resume: the run back to RUNNING, the tags set; its params kept so that values
        logged before are not sent again (a changed one is skipped, with a warning)."""
        run = client.get_run(run_id)  # NotFoundError for an unknown id
        if run.info.status != "RUNNING":
            client.update_run(run_id, "RUNNING")
        if self._tags:
            client.log_batch(run_id, tags=list(self._tags.items()))
        if params:
            self._params = dict(run.data.params)
        return run_id

    def _experiment(self, client: MlflowClient) -> str:
        if self._experiment_name is None:
            return self._experiment_id or DEFAULT_EXPERIMENT_ID
        found = client.get_experiment_by_name(self._experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self._experiment_name)
        except ServerError as exc:  # another process created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            again = client.get_experiment_by_name(self._experiment_name)
            if again is None:
                raise
            return again.experiment_id

    def _end_run(self, status: str) -> None:
        """End the current run (if this callback owns it), its events delivered first."""
        run_id, ends = self._run_id, self._ends
        if ends is None or run_id is None:
            return
        if ends.training == run_id:
            ends.training = None
        if run_id in ends.open:
            ends.open.remove(run_id)
            assert self._client is not None
            self._client.set_terminated(run_id, status)

    # -- what is logged --------------------------------------------------------------------------

    def _log_params(self, args: Any, model: Any) -> None:
        """``args.to_dict()`` over the model's config, as MLflowCallback logs them; values the run
        has already are not sent again (the engine packs the rest into requests the server takes)."""
        assert self._client is not None and self._run_id is not None
        combined: dict[str, Any] = {}
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            combined.update(config.to_dict())
        combined.update(args.to_dict())
        if self._flatten:
            combined = flatten_params(combined, sep=".")  # transformers' flatten_dict: a.b
        items = list(combined.items())
        if self._max_params is not None:
            items = items[: self._max_params]
        params, truncated, changed = [], [], []
        for raw_key, value in items:
            key, text = self._key(raw_key), str(value)
            if len(text) > MAX_PARAM_VALUE_LENGTH:
                truncated.append(key)
                text = text[:MAX_PARAM_VALUE_LENGTH]
            before = self._params.get(key)
            if before == text:
                continue
            if before is not None:
                changed.append(key)
                continue
            self._params[key] = text
            params.append((key, text))
        if truncated:
            logger.warning(
                "tracklane: param(s) %s longer than the server's %d characters were truncated; "
                "flatten_params=True (MLFLOW_FLATTEN_PARAMS) logs nested values one by one.",
                ", ".join(truncated),
                MAX_PARAM_VALUE_LENGTH,
            )
        if changed:
            logger.warning(
                "tracklane: run %s already has param(s) %s with other values; params cannot change, "
                "so the new values are not logged.",
                self._run_id,
                ", ".join(changed),
            )
        if params:
            self._client.log_batch(self._run_id, params=params)

    def _skip(self, key: str, value: Any) -> None:
        if key not in self._not_numbers:
            self._not_numbers.add(key)
            logger.warning(
                "tracklane: the Trainer logged %r = %.80r (%s), not a number: it is not logged as a metric "
                "(said once per key).",
                key,
                value,
                type(value).__name__,
            )


class _RunEnds:
    """The runs a callback started and has not ended, ended at interpreter exit.

    ``training`` is the run whose ``train()`` began and never reached ``on_train_end``: at exit it
    ends FAILED (the Trainer raised, whether or not the program caught it), KILLED if the process
    is dying of Ctrl-C; the other runs end as the process does (``exit_status_of_process``). The hook
    belongs to the process that registered it: a forked child does not end its parent's runs.
    """

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.open: list[str] = []  # innermost last
        self.training: str | None = None
        self.pid = os.getpid()
        atexit.register(self.at_exit)

    def end_all(self, status: str, training_status: str | None = None) -> None:
        problem: Exception | None = None
        while self.open:
            run_id = self.open.pop()
            chosen = training_status if training_status and run_id == self.training else status
            try:
                self.client.set_terminated(run_id, chosen)
            except Exception as exc:  # end the others all the same
                problem = problem or exc
        self.training = None
        if problem is not None:
            raise problem

    def at_exit(self) -> None:
        if os.getpid() != self.pid or not self.open:
            return
        try:
            self.end_all(exit_status_of_process(), exit_status_of_process(failed=True))
        except Exception as exc:  # a clean exit must never turn into a traceback because of telemetry
            logger.warning("tracklane: at exit, ending the Trainer's runs failed: %s", exc)


def _number(value: Any) -> float | None:
    """A metric value as MLflowCallback takes them: a real number, or a one-element tensor."""
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    numel = getattr(value, "numel", None)  # a torch tensor, without importing torch here
    if callable(numel) and numel() == 1:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def _fluent_run_id() -> str | None:
    """The active run of ``tracklane.mlflow`` (MLflowCallback logs into ``mlflow.active_run()``)."""
    from .. import mlflow as fluent

    active = fluent.active_run()
    return None if active is None else active.info.run_id


# -- MLflowCallback's environment variables, read through tracklane's settings ---------------------


def _env_flag(name: str, argument: str) -> bool:
    """``MLFLOW_NESTED_RUN``, ``MLFLOW_FLATTEN_PARAMS``, ``HF_MLFLOW_LOG_ARTIFACTS``: off when unset."""
    return env_bool(name, f"TracklaneCallback({argument}=...)") is True


def _env_tags() -> dict[str, Any]:
    """``MLFLOW_TAGS``: a JSON object of run tags."""
    raw = env("MLFLOW_TAGS")
    if raw is None:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        raise ConfigurationError(
            f'MLFLOW_TAGS={raw!r} is not a JSON object; set it like \'{{"team": "nlp"}}\', or pass '
            "TracklaneCallback(tags=...)."
        )
    return {str(k): v for k, v in tags.items()}


def _env_max_log_params() -> int | None:
    """``MLFLOW_MAX_LOG_PARAMS``: a whole number; anything else is ignored, as MLflowCallback does."""
    raw = env("MLFLOW_MAX_LOG_PARAMS")
    return int(raw) if raw is not None and raw.isdigit() else None
