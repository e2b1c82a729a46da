"""Argument types for the ``tracklane`` subcommands: numbers that refuse what makes no sense.

argparse's own ``type=float`` takes ``nan``, ``inf`` and ``-5`` without a word, and a retry window
of NaN then waits forever or not at all. These ``type=`` functions refuse such values with a
message that names the value and the rule; argparse prints it after the usage line and exits 2.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_float", "positive_float", "positive_int"]


def positive_float(text: str) -> float:
    """A finite number greater than zero (a timeout, a window)."""
    value = _finite(text, "a number greater than 0")
    if value <= 0:
        raise _refuse(text, "not greater than 0", "a number greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number, zero or more (a delay that may be none)."""
    value = _finite(text, "a number of 0 or more")
    if value < 0:
        raise _refuse(text, "negative", "a number of 0 or more")
    return value


def positive_int(text: str) -> int:
    """A whole number greater than zero (a count)."""
    try:
        value = int(text)
    except ValueError:
        raise _refuse(text, "not a whole number", "a whole number greater than 0") from None
    if value <= 0:
        raise _refuse(text, "not greater than 0", "a whole number greater than 0")
    return value


def _finite(text: str, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _refuse(text, "not a number", rule) from None
    if not math.isfinite(value):
        raise _refuse(text, "not a finite number", rule)
    return value


def _refuse(text: str, problem: str, rule: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r} is {problem}; it must be {rule}")
