"""What every integration needs: keys the server takes, and failures that never stop training."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .._limits import KEY_PATTERN, MAX_KEY_LENGTH

logger = logging.getLogger("tracklane")
F = TypeVar("F", bound=Callable[..., Any])

_BAD_CHARS = re.compile(r"[^/\w.\- :]")


class KeySanitizer:
    """Rename keys the server would refuse (characters outside ``[/\\w.\\- :]``, over 250 chars,
    ``..`` segments): each such key becomes a legal one, and the first renaming of each key is
    logged once, so a callback never raises into the training loop over a name."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        found = self._seen.get(key)
        if found is not None:
            return found
        clean = str(key)
        if not KEY_PATTERN.match(clean) or len(clean) > MAX_KEY_LENGTH or "/../" in f"/{clean}/":
            clean = _BAD_CHARS.sub("_", clean).replace("..", "_.")[:MAX_KEY_LENGTH] or "_"
            logger.warning("tracklane: key %r renamed to %r (the server refuses the original).", key, clean)
        self._seen[key] = clean
        return clean

    def mapping(self, items: Mapping[str, Any]) -> dict[str, Any]:
        return {self(k): v for k, v in items.items()}


def never_raises(what: str) -> Callable[[F], F]:
    """A callback method that logs (once per method) instead of raising: telemetry must never stop
    a training run."""

    def wrap(func: F) -> F:
        warned = False

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            nonlocal warned
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                if not warned:
                    warned = True
                    logger.warning(
                        "tracklane: %s failed (%s: %s); training goes on.", what, type(exc).__name__, exc
                    )
                else:
                    logger.debug("tracklane: %s failed again: %s", what, exc)
                return None

        return inner  # type: ignore[return-value]

    return wrap


def flatten_params(params: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested hyperparameters as ``a/b`` keys (``sep``: the framework's own joiner), values as they
    are (the client stringifies)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}{sep}", sep))
        else:
            out[name] = value
    return out
