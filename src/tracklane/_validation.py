"""The server's validation rules, applied at the call site.

A logging call that would be refused by the server raises :class:`InvalidInputError` on the line
that made it, naming the key and the rule, instead of failing a whole batch later on the worker.
These functions are on the hot path: each starts with the cheapest check that accepts the
common case (a ``float`` value, an ``int`` step) and only then looks further.
"""

from __future__ import annotations

import logging
import operator
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ._exceptions import InvalidInputError
from ._limits import (
    KEY_PATTERN,
    MAX_EXPERIMENT_TAG_VALUE_LENGTH,
    MAX_KEY_LENGTH,
    MAX_STEP,
    MAX_TAG_VALUE_LENGTH,
    MIN_STEP,
)

#: The value OICM stores for a tag given by name only (``set_run_tags(["baseline"])``).
USER_TAG_VALUE = "_OI_USER_TAG"


def check_key(key: object, what: str) -> str:
    """Return ``key`` if the server would accept it as the key of a ``what`` (metric, param, tag)."""
    if not isinstance(key, str):
        raise InvalidInputError(
            f"{what} key {key!r} is a {type(key).__name__}; keys must be strings. "
            f"Pass str({key!r}) if that is the name you mean."
        )
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(
            f"{what} key {key[:40]!r}... is {len(key)} characters long; the server allows at most "
            f"{MAX_KEY_LENGTH}. Shorten the key."
        )
    if not KEY_PATTERN.match(key):
        bad = sorted({c for c in key if not KEY_PATTERN.match(c)})
        raise InvalidInputError(
            f"{what} key {key!r} contains {''.join(bad)!r}; keys may only contain letters, digits, "
            "underscores (_), dashes (-), periods (.), spaces ( ), colons (:) and slashes (/)."
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        raise InvalidInputError(
            f"{what} key {key!r} is not a normalised relative path (the server refuses empty keys, "
            "'.', leading '/' or '..', and doubled or trailing slashes). Use a key like 'train/loss'."
        )
    return key


#: An MLflow run id: 32 lowercase hex digits.
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def metric_value(key: str, value: Any) -> float:
    """Convert a metric value to ``float``: Python and NumPy numbers and any 0-d ``__float__`` scalar.

    Bools and strings are refused even though Python could convert them: a ``True`` or ``"0.5"``
    logged as a metric is almost always a bug the user wants to hear about.
    """
    tp = type(value)
    if tp is float:
        return value  # type: ignore[no-any-return]
    if tp is int:
        return _int_to_float(key, value)
    if tp is bool or isinstance(value, (str, bytes, bytearray)) or "bool" in tp.__name__:
        if isinstance(value, str) and _RUN_ID.fullmatch(key):
            raise InvalidInputError(
                f"log_metric({key!r}, {value!r}, ...): this looks like MlflowClient's call shape "
                "log_metric(run_id, key, value). This client logs to its active run: call "
                "log_metric(key, value); for explicit run ids use tracklane.MlflowClient."
            )
        raise InvalidInputError(
            f"metric {key!r}: value {value!r} is a {tp.__name__}; metric values must be real numbers. "
            "Log it as a param or tag, or convert it with float() if a number is meant."
        )
    if isinstance(value, int):
        return _int_to_float(key, value)
    if getattr(value, "ndim", 0) != 0 or getattr(value, "shape", ()) not in ((), None):
        raise InvalidInputError(
            f"metric {key!r}: value has shape {getattr(value, 'shape', '?')}; a metric value must be a "
            "single number (a 0-d scalar). Log each element under its own key, or call .item()."
        )
    if not hasattr(tp, "__float__"):
        raise InvalidInputError(
            f"metric {key!r}: value {value!r} of type {tp.__name__} is not a real number "
            "(it has no __float__). Metric values must be int, float or a 0-d numeric scalar."
        )
    try:
        return float(value)
    except Exception as exc:  # any __float__ may raise anything: it is this entry's fault, not the call's
        raise InvalidInputError(
            f"metric {key!r}: value of type {tp.__name__} cannot be converted to a float "
            f"({type(exc).__name__}: {exc})."
        ) from None


def _int_to_float(key: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise InvalidInputError(
            f"metric {key!r}: integer value {value} is too large for a 64-bit float."
        ) from None


def check_step(key: str, step: Any) -> int:
    """Return ``step`` as an ``int`` in the server's 64-bit range; floats and bools are refused."""
    if type(step) is int:
        if MIN_STEP <= step <= MAX_STEP:
            return step
        raise InvalidInputError(f"metric {key!r}: step {step} is outside the 64-bit integer range.")
    if isinstance(step, bool) or "bool" in type(step).__name__:
        raise InvalidInputError(f"metric {key!r}: step {step!r} is a bool; steps must be integers.")
    try:
        as_int = operator.index(step)
    except TypeError:
        hint = f" Use int({step!r})." if isinstance(step, float) and step.is_integer() else ""
        raise InvalidInputError(
            f"metric {key!r}: step {step!r} is a {type(step).__name__}; steps must be integers.{hint}"
        ) from None
    return check_step(key, as_int)


def check_timestamp(key: str, timestamp: Any) -> int:
    """Return ``timestamp`` (milliseconds since the epoch) as a non-negative ``int``."""
    if type(timestamp) is not int:
        if isinstance(timestamp, (bool, float)):
            raise InvalidInputError(
                f"metric {key!r}: timestamp {timestamp!r} must be an integer number of milliseconds "
                "since the epoch, e.g. int(time.time() * 1000)."
            )
        try:
            timestamp = operator.index(timestamp)
        except TypeError:
            raise InvalidInputError(
                f"metric {key!r}: timestamp {timestamp!r} must be an integer number of milliseconds."
            ) from None
    if not 0 <= timestamp <= MAX_STEP:
        raise InvalidInputError(
            f"metric {key!r}: timestamp {timestamp} must be a non-negative number of milliseconds "
            "since the epoch."
        )
    return timestamp  # type: ignore[no-any-return]


def text_value(key: str, value: Any, what: str, limit: int) -> str:
    """Stringify a param or tag value the way MLflow does (``str(value)``), check its length, and that
    it can be sent as UTF-8 (a lone surrogate, e.g. from ``os.fsdecode`` of a non-UTF-8 file name,
    cannot: it would fail its whole request)."""
    if type(value) is str:
        text = value
    else:
        try:
            text = str(value)
        except Exception as exc:  # a __str__ that raises is this entry's fault, not the call's
            raise InvalidInputError(
                f"{what} {key!r}: str() of the {type(value).__name__} value failed "
                f"({type(exc).__name__}: {exc}). Pass a string."
            ) from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{what} {key!r}: value has a character that cannot be sent as UTF-8 "
                f"({text[exc.start : exc.end]!r} at position {exc.start}, a lone surrogate such as "
                "os.fsdecode() makes of a non-UTF-8 file name). Use os.fsdecode(...).encode('utf-8', "
                "'surrogateescape').decode('utf-8', 'replace') or another readable form."
            ) from None
    if len(text) > limit:
        raise InvalidInputError(
            f"{what} {key!r}: value is {len(text)} characters long; the server allows at most {limit}. "
            "Shorten it, or store the full text elsewhere and log a reference."
        )
    return text


def check_status(status: object) -> str:
    """Return a terminal run status the server accepts."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise InvalidInputError(f"run status {status!r} is not one of 'FINISHED', 'FAILED', 'KILLED'.")
    return str(status)


_logger = logging.getLogger("tracklane")
_warned_long: set[tuple[str, str]] = set()


def mlflow_truncated(values: Mapping[Any, Any], limit: int, what: str, truncate: bool) -> Mapping[Any, Any]:
    """MLflow's rule for long param and run tag values (``mlflow/utils/validation.py``,
    ``_validate_length_limit(..., truncate=True)``): the value as ``str``, cut to ``limit`` characters
    with MLflow's warning (once per key), when ``truncate`` (``$MLFLOW_TRUNCATE_LONG_VALUES``); else
    left for the call site to refuse. ``what``: "Param value" or "Tag value". Only the MLflow faces
    call this: the OICM face refuses long values. Returns ``values`` itself when nothing is cut."""
    if not truncate:
        return values
    cut: dict[Any, Any] | None = None
    for key, value in values.items():
        if type(value) is not str:
            try:
                value = str(value)
            except Exception:  # text_value reports it, with the key
                continue
        if len(value) <= limit:
            continue
        if cut is None:
            cut = dict(values)
        cut[key] = value[:limit]
        if (what, str(key)) not in _warned_long and len(_warned_long) < 10_000:
            _warned_long.add((what, str(key)))
            _logger.warning(
                "%s '%s...' (%d characters) is truncated to %d characters to meet the length limit.",
                what,
                value[:100],
                len(value),
                limit,
            )
    return values if cut is None else cut


def tag_dict(tags: Mapping[str, Any] | Iterable[str] | None, what: str) -> dict[str, str]:
    """Tags in both dialects: a mapping is MLflow's key/values; a list of names is OICM's
    (``name: _OI_USER_TAG``)."""
    if tags is None:
        return {}
    if isinstance(tags, Mapping):
        out = {}
        for key, value in tags.items():
            check_key(key, f"{what} tag")
            limit = MAX_EXPERIMENT_TAG_VALUE_LENGTH if what == "experiment" else MAX_TAG_VALUE_LENGTH
            out[key] = text_value(key, value, f"{what} tag", limit)
        return out
    return dict.fromkeys(checked_tag_names(tags, what), USER_TAG_VALUE)


def checked_tag_names(names: Iterable[str], what: str) -> list[str]:
    """OICM's tag names, each checked as a key and once, in order; a bare string is refused."""
    if isinstance(names, str):
        raise InvalidInputError(
            f"{what} tags are a list of tag names, got the string {names!r}; pass [{names!r}]."
        )
    out = []
    for name in names:
        check_key(name, f"{what} tag")
        text_value(name, USER_TAG_VALUE, f"{what} tag", MAX_EXPERIMENT_TAG_VALUE_LENGTH)
        if name not in out:
            out.append(name)
    return out
