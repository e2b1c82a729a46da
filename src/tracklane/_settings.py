"""Client settings: where the server is, how to authenticate, and the engine's bounds.

The one place that reads the environment. Everything a client needs is resolved here once, at
construction, from arguments with environment fallbacks (an explicit argument always wins); nothing
is ever written back to the environment, so two clients in one process stay independent. Every
variable tracklane reads is named in ``ENV`` below, and every boolean one goes through ``env_bool``.
"""

from __future__ import annotations

import hmac
import importlib.util
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from ._exceptions import ConfigurationError

#: Every environment variable tracklane reads, and what it sets.
ENV = {
    "OIP_TRACKING_SERVER": "api_host",
    "OIP_WORKLOAD_ACCESS_KEY": "api_key",
    "OIP_WORKLOAD_ID": "sent as the OIP-Workload-Id header",
    "OIP_OFFLINE_MODE": "offline_mode (boolean)",
    "TRACKLANE_OVERFLOW": "overflow",
    "TRACKLANE_EVENT_LOG_MAX_BYTES": "disk bound of the kill-safe event log (bytes; 0 turns it off)",
    "TRACKLANE_SENDER": "who delivers the event log: 'thread' (default, in this process) or 'process'",
    # MLflow's own (mlflow/environment_variables.py), read the way MLflow reads them:
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "start_run(log_system_metrics=) (boolean)",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "system_metrics_interval",
    "MLFLOW_SYSTEM_METRICS_NODE_ID": "system metrics under system/<node>/ (default in a job: the host name)",
    "MLFLOW_RUN_ID": "start_run() with no run_id or run_name attaches to this run",
    "MLFLOW_TRACKING_URI": "tracklane.mlflow, MlflowClient: the tracking URI (http(s) server, or a path)",
    "MLFLOW_TRACKING_TOKEN": "every request to an MLflow server: sent as Authorization: Bearer",
    "MLFLOW_TRACKING_USERNAME": "every request to an MLflow server: basic auth user (with the password)",
    "MLFLOW_TRACKING_PASSWORD": "every request to an MLflow server: basic auth password",
    "MLFLOW_TRACKING_INSECURE_TLS": "every request: do not verify the server's TLS certificate (boolean)",
    "MLFLOW_TRACKING_SERVER_CERT_PATH": "every request: check the server's TLS certificate with this CA file",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH": "every request: present this client certificate (PEM, cert and key)",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "every request: request_timeout, in seconds",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "every request: give up after this many retries",
    "MLFLOW_TRUNCATE_LONG_VALUES": "MLflow faces: cut long param/tag values (boolean, default on)",
    "MLFLOW_REGISTRY_URI": "tracklane.mlflow.get_registry_uri() when set_registry_uri was not called",
    "MLFLOW_EXPERIMENT_NAME": "tracklane.mlflow: the experiment of runs started with none set",
    "MLFLOW_EXPERIMENT_ID": "tracklane.mlflow: the experiment of runs started with none set (by id)",
    # transformers' MLflowCallback's, honoured by tracklane.integrations.transformers:
    "MLFLOW_TAGS": "TracklaneCallback (transformers): tags of the run, as JSON",
    "MLFLOW_NESTED_RUN": "TracklaneCallback (transformers): a child run per training (boolean)",
    "MLFLOW_FLATTEN_PARAMS": "TracklaneCallback (transformers): nested params as a.b keys (boolean)",
    "HF_MLFLOW_LOG_ARTIFACTS": "TracklaneCallback (transformers): upload output_dir at the end (boolean)",
    "MLFLOW_MAX_LOG_PARAMS": "TracklaneCallback (transformers): log at most this many params",
    # Set by torchrun, torch.distributed, DeepSpeed, Accelerate and most launchers:
    "RANK": "this process's rank in the job (0 creates and ends the run)",
    "LOCAL_RANK": "this process's rank on its node (0 samples the node's system metrics)",
    "WORLD_SIZE": "processes in the job (> 1: a distributed job)",
    "TERM": "'dumb': tracklane sync prints plain progress lines, no bar",
}
RANK_LOGGING = ("all", "zero_only", "prefixed")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: A host ending in this path is the OICM platform's tracking service.
OICM_SUFFIX = "/api/tracking"
OVERFLOW_POLICIES = ("spill", "block", "drop_newest", "drop_oldest")


class Secret:
    """An API key that never shows itself in a repr, a log line or an exception."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)  # equal keys must hash alike; a key's own hash would say something of it

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        raise TypeError("an API key is not pickled; build the client again in the other process")


@dataclass(frozen=True)
class ServerConfig:
    """Where REST calls go and what they carry."""

    api_host: str
    api_key: Secret | None = None
    verify_ssl: bool = True
    workload_id: str | None = None
    request_timeout: float = 30.0
    #: Keep the platform's address out of the log: no UI links after start_run.
    hide_host: bool = False
    #: Basic auth (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, or the URL's user info).
    username: str | None = None
    password: Secret | None = None
    #: False: no certificate check (``MLFLOW_TRACKING_INSECURE_TLS``); a path: the CA file to check
    #: the server's certificate with (``MLFLOW_TRACKING_SERVER_CERT_PATH``).
    tls_verify: bool | str = True
    #: A PEM file with the client's certificate and key (``MLFLOW_TRACKING_CLIENT_CERT_PATH``).
    client_cert: str | None = None
    #: Give up a request after this many retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); None: the
    #: retry window alone decides.
    max_retries: int | None = None

    def __repr__(self) -> str:
        # The generated repr would show the user name; the password is a Secret either way.
        user = ", username=***" if self.username is not None else ""
        return f"ServerConfig(api_host={self.api_host!r}{user}, api_key={self.api_key!r})"

    @property
    def is_oicm(self) -> bool:
        return self.api_host.endswith(OICM_SUFFIX)

    @property
    def platform_url(self) -> str:
        """The OICM web UI's root (``api_host`` without ``/api/tracking``)."""
        return self.api_host[: -len(OICM_SUFFIX)] if self.is_oicm else self.api_host

    def rest_base(self, workspace_id: str | None) -> str:
        """Root of MLflow's REST API for this server (and, on OICM, this workspace)."""
        if not self.is_oicm:
            return f"{self.api_host}/api/2.0/mlflow"
        if not workspace_id:
            raise ConfigurationError(
                "This is an OICM host, where experiments live in a workspace: pass "
                "workspace_id= to set_experiment() or create_experiment()."
            )
        return f"{self.api_host}/v1/workspaces/{workspace_id}/mlflow/api/2.0/mlflow"

    def artifacts_base(self, workspace_id: str | None) -> str:
        """Root of MLflow's artifact proxy (``mlflow server --serve-artifacts``) beside the REST API."""
        return self.rest_base(workspace_id)[: -len("mlflow")] + "mlflow-artifacts/artifacts"

    def ui_links(self, workspace_id: str | None, experiment_id: str, run_id: str) -> tuple[str, str] | None:
        """The OICM web UI's pages of a run and of its experiment; None off OICM or with hide_host."""
        if not self.is_oicm or self.hide_host or not workspace_id:
            return None
        experiment = f"{self.platform_url}/ws/{workspace_id}/tracking/experiments/{experiment_id}"
        return f"{experiment}/run/{run_id}/overview", experiment


@dataclass(frozen=True)
class EngineConfig:
    """Bounds of the buffer and of every wait the engine makes."""

    max_buffer: int = 100_000
    batch_size: int = 1000
    flush_interval: float = 0.5
    max_in_flight: int = 2
    retry_window: float = 30.0
    exit_timeout: float = 10.0
    overflow: str = "spill"
    #: Longest a logging call waits for room when memory, journal and server are all full or gone.
    block_timeout: float | None = 10.0
    journal_dir: str | None = None
    #: Seconds between system metrics samples; None: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    #: or 10 (see ``_sysmetrics``).
    system_metrics_interval: float | None = None

    def __post_init__(self) -> None:
        if self.system_metrics_interval is not None:
            check_interval(self.system_metrics_interval, "system_metrics_interval")


def strip_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its userinfo, and the user name and password it held (percent-decoded).

    ``http://user:SECRET@host:5000`` -> (``http://host:5000``, ``user``, ``SECRET``). The one place
    credentials are taken out of a URL: done when settings are parsed, so the clean URL is the only
    one a repr, a log line, an exception, ``stats()`` or the journal can ever show.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    clean = urlunsplit(parts._replace(netloc=hostport))
    return clean, unquote(user) or None, unquote(password) if colon else None


def resolve_server(
    api_host: str | None,
    api_key: str | None,
    *,
    verify_ssl: bool = True,
    request_timeout: float | None = None,
    hide_host: bool = False,
) -> ServerConfig | None:
    """Build the server settings from arguments, else ``OIP_TRACKING_SERVER`` and
    ``OIP_WORKLOAD_ACCESS_KEY`` (else ``MLFLOW_TRACKING_TOKEN``); ``None`` when no server is
    configured at all. MLflow's connection variables (``http_settings``) apply to every server."""
    host = api_host if api_host is not None else env("OIP_TRACKING_SERVER")
    key = api_key if api_key is not None else env("OIP_WORKLOAD_ACCESS_KEY") or env("MLFLOW_TRACKING_TOKEN")
    if not host:
        return None
    host, username, password = strip_credentials(host.rstrip("/"))
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"api_host {host!r} is not an http(s) URL. Pass the tracking server's address, e.g. "
            "'http://127.0.0.1:5000' for MLflow or 'https://HOST/api/tracking' for OICM."
        )
    connection = http_settings(request_timeout)
    if username is not None:  # the URL's own user info wins over MLFLOW_TRACKING_USERNAME/_PASSWORD
        connection["username"] = username
        connection["password"] = Secret(password) if password is not None else None
    config = ServerConfig(
        api_host=host,
        api_key=Secret(key) if key else None,
        verify_ssl=verify_ssl,
        workload_id=env("OIP_WORKLOAD_ID"),
        hide_host=hide_host,
        **connection,
    )
    if config.is_oicm and config.api_key is None:
        raise ConfigurationError(
            "The OICM platform needs an API key: pass api_key= or set OIP_WORKLOAD_ACCESS_KEY "
            "(OICM: user menu -> API Keys -> Generate API key)."
        )
    return config


def http_settings(request_timeout: float | None = None) -> dict[str, Any]:
    """MLflow's connection variables, read as MLflow's REST client reads them (``mlflow/
    environment_variables.py``, ``mlflow/utils/rest_utils.py``), as ``ServerConfig`` fields.
    ``request_timeout``: an explicit argument, which wins over ``MLFLOW_HTTP_REQUEST_TIMEOUT``."""
    found: dict[str, Any] = {"request_timeout": request_timeout}
    if request_timeout is None:
        raw = env("MLFLOW_HTTP_REQUEST_TIMEOUT")
        found["request_timeout"] = 30.0 if raw is None else _positive(raw, "MLFLOW_HTTP_REQUEST_TIMEOUT")
    username, password = env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD")
    if (username is None) != (password is None):
        missing = "MLFLOW_TRACKING_PASSWORD" if password is None else "MLFLOW_TRACKING_USERNAME"
        raise ConfigurationError(
            f"Basic auth needs both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; {missing} "
            "is not set. Set it, or unset the other."
        )
    if username is not None and password is not None:
        found["username"], found["password"] = username, Secret(password)
    insecure = env_bool("MLFLOW_TRACKING_INSECURE_TLS", "nothing (unset it)")
    ca_file = env("MLFLOW_TRACKING_SERVER_CERT_PATH")
    if insecure and ca_file:
        raise ConfigurationError(
            "MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: either the "
            "server's certificate is checked (against that CA file) or it is not. Unset one of them."
        )
    if insecure:
        found["tls_verify"] = False
    elif ca_file:
        found["tls_verify"] = _readable_file(ca_file, "MLFLOW_TRACKING_SERVER_CERT_PATH")
    client_cert = env("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if client_cert:
        found["client_cert"] = _readable_file(client_cert, "MLFLOW_TRACKING_CLIENT_CERT_PATH")
    retries = env("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if retries is not None:
        try:
            found["max_retries"] = int(retries)
        except ValueError:
            found["max_retries"] = -1
        if found["max_retries"] < 0:
            raise ConfigurationError(
                f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries!r} is not a whole number of retries >= 0."
            )
    return found


def _positive(raw: str, name: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigurationError(f"{name}={raw!r} is not a positive number of seconds, e.g. 120.")
    return seconds


def _readable_file(path: str, name: str) -> str:
    if not os.path.isfile(path):
        raise ConfigurationError(f"{name}={path!r}: no such file. Give the path of a PEM file.")
    return path


class _ProcessUris:
    """MLflow's process-wide URIs as ``tracklane.mlflow.set_tracking_uri``/``set_registry_uri`` set
    them: ``MlflowClient()`` with no URI uses them, as MLflow's client uses the fluent module's."""

    tracking: str | None = None
    registry: str | None = None


PROCESS_URIS = _ProcessUris()


def truncate_long_values() -> bool:
    """``$MLFLOW_TRUNCATE_LONG_VALUES`` (default on): long param and tag values are cut, not refused."""
    found = env_bool("MLFLOW_TRUNCATE_LONG_VALUES", "shorter values")
    return True if found is None else found


#: MLflow's ``DATABASE_ENGINES`` (``mlflow/utils/uri.py``): a tracking URI of these schemes
#: (``+driver`` allowed, e.g. ``postgresql+psycopg2``) names one of MLflow's database stores.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def is_database_uri(uri: str) -> bool:
    return urlsplit(uri).scheme.split("+", 1)[0] in DATABASE_SCHEMES


@dataclass(frozen=True)
class Destination:
    """Where an MLflow face logs: a tracking server, MLflow's database store (``database``), or
    (both None) the local journal under ``storage``. ``uri`` is how ``get_tracking_uri`` reports it."""

    uri: str
    server: ServerConfig | None
    storage: str | None
    database: str | None = None


def tracking_destination(tracking_uri: str | None) -> Destination:
    """MLflow's tracking URI rules, for ``tracklane.mlflow`` and ``MlflowClient``: the argument, else
    the one ``set_tracking_uri`` set, else ``$MLFLOW_TRACKING_URI``, else ``$OIP_TRACKING_SERVER``;
    an http(s) URL is a server (with ``$MLFLOW_TRACKING_TOKEN``, else ``$OIP_WORKLOAD_ACCESS_KEY``,
    as the bearer token); a local path or ``file:`` URI is the journal there (offline; ``tracklane
    sync`` uploads it); nothing at all is the journal in the working directory, as MLflow's default
    is a local store."""
    uri = tracking_uri or PROCESS_URIS.tracking or env("MLFLOW_TRACKING_URI") or env("OIP_TRACKING_SERVER")
    if not uri:
        return Destination("file:./ml_runs", None, ".")
    if uri.startswith(("tracklane+http://", "tracklane+https://")):
        uri = uri[len("tracklane+") :]  # the MLflow plugin's scheme names the same server
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        token = env("MLFLOW_TRACKING_TOKEN")
        server = resolve_server(uri, token)
        assert server is not None
        return Destination(server.api_host, server, None)
    if parts.scheme == "file":
        return Destination(uri, None, _storage_of(parts.path or "."))
    if is_database_uri(uri):
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigurationError(
                f"tracking URI {uri.split('://', 1)[0]}://...: a database is MLflow's own store, which "
                "tracklane writes through MLflow's SQL store: pip install 'tracklane[mlflow]' (or use an "
                "http(s) tracking server, or a local directory for tracklane's journal)."
            )
        return Destination(uri, None, None, database=uri)
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive, a path
        raise ConfigurationError(
            f"tracking URI {uri!r}: tracklane logs to http(s) tracking servers and local paths; "
            f"{parts.scheme!r} is not supported. Use e.g. 'http://127.0.0.1:5000' or a directory."
        )
    return Destination(uri, None, _storage_of(uri))


def _storage_of(path: str) -> str:
    """A local tracking URI names the journal's folder (``./ml_runs``, what ``get_tracking_uri``
    reports) or the storage directory holding it: either way, the storage directory."""
    trimmed = path.rstrip("/")
    if trimmed == "ml_runs" or trimmed.endswith("/ml_runs"):
        return trimmed[: -len("ml_runs")].rstrip("/") or "."
    return path


def default_experiment() -> tuple[str | None, str | None]:
    """(``$MLFLOW_EXPERIMENT_NAME``, ``$MLFLOW_EXPERIMENT_ID``): the experiment MLflow's fluent API
    uses when none is set."""
    return env("MLFLOW_EXPERIMENT_NAME"), env("MLFLOW_EXPERIMENT_ID")


def check_overflow(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise ConfigurationError(
            f"overflow={policy!r} is not one of {', '.join(map(repr, OVERFLOW_POLICIES))}."
        )
    return policy


def check_interval(value: Any, source: str) -> float:
    """``value`` as a sampling interval in seconds; ConfigurationError unless a positive number."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(value, bool) or not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(
            f"{source}={value!r} is not a sampling interval; give a positive number of seconds, e.g. 10."
        )
    return seconds


def env(name: str) -> str | None:
    """``$name`` stripped, or None when unset or blank. Only names listed in ``ENV`` are read."""
    assert name in ENV, f"{name} is not a documented tracklane setting"
    raw = os.environ.get(name)
    return raw.strip() if raw is not None and raw.strip() else None


#: Default disk bound of the event log: 256 MiB is 64 segments of 4 MiB, ~6.7M metric records,
#: 60x what a default client holds unacknowledged (``max_buffer`` plus requests in flight, ~2-3
#: segments), so only acknowledgements stuck for a long time reach it; and it is small beside any
#: disk that trains models. Reached, the log stops protecting new events (one WARNING) until
#: acknowledgements free a segment; nothing else changes.
EVENT_LOG_MAX_BYTES = 256 << 20


def event_log_max_bytes() -> int:
    """``$TRACKLANE_EVENT_LOG_MAX_BYTES`` (default ``EVENT_LOG_MAX_BYTES``); 0 turns the log off."""
    raw = env("TRACKLANE_EVENT_LOG_MAX_BYTES")
    if raw is None:
        return EVENT_LOG_MAX_BYTES
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            f"TRACKLANE_EVENT_LOG_MAX_BYTES={raw!r} is not a number of bytes; set it to e.g. "
            f"{EVENT_LOG_MAX_BYTES} (or 0 to turn the event log off)."
        ) from None
    return value


SENDERS = ("thread", "process")


def sender_setting() -> str:
    """``$TRACKLANE_SENDER``: ``thread`` (the default: a worker thread of this process delivers) or
    ``process`` (a sender process tails the event log and delivers it, off this process's GIL)."""
    raw = (env("TRACKLANE_SENDER") or "thread").lower()
    if raw not in SENDERS:
        raise ConfigurationError(
            f"TRACKLANE_SENDER={raw!r} is not a sender; set it to 'thread' or 'process'."
        )
    return raw


def env_bool(name: str, hint: str) -> bool | None:
    """``$name`` as a boolean (1/true/yes/on, 0/false/no/off, any case); None when unset.

    Raises ConfigurationError for anything else, with ``hint`` saying which argument to pass instead.
    """
    raw = env(name)
    if raw is None:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; set it to 'true' or 'false', or pass {hint}.")


def offline_mode_setting(offline_mode: bool | None) -> bool | None:
    """The ``offline_mode`` argument, else ``$OIP_OFFLINE_MODE``; None: decide by whether a server is set."""
    if offline_mode is not None:
        return offline_mode
    return env_bool("OIP_OFFLINE_MODE", "offline_mode=")


def overflow_setting(overflow: str | None) -> str:
    """The ``overflow`` argument, else ``$TRACKLANE_OVERFLOW``, else ``"spill"``."""
    return check_overflow(overflow or env("TRACKLANE_OVERFLOW") or "spill")


#: MLflow's ``SystemMetricsMonitor`` default ``sampling_interval``, in seconds.
DEFAULT_SAMPLING_INTERVAL = 10.0


def system_metrics_wanted(log_system_metrics: bool | None) -> bool:
    """Whether a run samples system metrics: the argument, else ``$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``,
    else on (the OICM platform's default; MLflow's own default is off)."""
    if log_system_metrics is not None:
        return bool(log_system_metrics)
    found = env_bool("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "start_run(log_system_metrics=...)")
    return True if found is None else found


def system_metrics_interval(configured: float | None) -> float:
    """The constructor's ``system_metrics_interval``, else ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``,
    else 10 s."""
    if configured is not None:
        return check_interval(configured, "system_metrics_interval")
    raw = env("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    if raw is None:
        return DEFAULT_SAMPLING_INTERVAL
    return check_interval(raw, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


@dataclass(frozen=True)
class JobRanks:
    """Where this process stands in a distributed job (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0 creates (or resumes) the job's run and is the only one to end it."""
        return self.rank == 0


def job_ranks() -> JobRanks:
    """``$RANK``, ``$LOCAL_RANK`` and ``$WORLD_SIZE`` as the launchers set them."""
    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = env(name)
        try:
            values[name] = default if raw is None else int(raw)
        except ValueError:
            raise ConfigurationError(
                f"{name}={raw!r} is not a whole number; the job launcher sets it."
            ) from None
    ranks = JobRanks(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
        raise ConfigurationError(
            f"RANK={ranks.rank} is not a rank of a job of WORLD_SIZE={ranks.world_size}."
        )
    return ranks


def launcher_run_id() -> str | None:
    """``$MLFLOW_RUN_ID``: the run a launcher made for this job, as MLflow's start_run reads it."""
    return env("MLFLOW_RUN_ID")


def system_metrics_node_id(ranks: JobRanks) -> str | None:
    """``$MLFLOW_SYSTEM_METRICS_NODE_ID``, else the host name in a distributed job (so several nodes'
    samples do not mix under one key), else None (``system/...`` as MLflow names them)."""
    return env("MLFLOW_SYSTEM_METRICS_NODE_ID") or (socket.gethostname() if ranks.distributed else None)


def check_rank_logging(mode: str) -> str:
    if mode not in RANK_LOGGING:
        raise ConfigurationError(f"rank_logging={mode!r} is not one of {', '.join(map(repr, RANK_LOGGING))}.")
    return mode
