"""Durations as users give them (seconds or ``timedelta``), checked once, as seconds."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TypeAlias

__all__ = ["Duration", "to_positive_seconds", "to_seconds"]

Duration: TypeAlias = "int | float | timedelta"
"""A length of time: seconds as ``int``/``float``, or a ``datetime.timedelta``."""


def to_seconds(value: object, what: str) -> float:
    """Return ``value`` as a finite number of seconds, zero or more.

    Raises:
        TypeError: ``value`` is not a number of seconds or a ``timedelta`` (``bool`` included).
        ValueError: ``value`` is negative, NaN or infinite. Both errors name ``what`` and the value.
    """
    if type(value) is float and 0.0 <= value < math.inf:
        return value  # the usual case (a hold's nak), in one comparison; NaN fails it too
    seconds = _finite_seconds(value, what)
    if seconds < 0:
        raise ValueError(f"{what} must be zero or more seconds, got {value!r}")
    return seconds


def to_positive_seconds(value: object, what: str) -> float:
    """Like [`to_seconds`][to_seconds], and zero is refused too (``ValueError``)."""
    seconds = _finite_seconds(value, what)
    if seconds <= 0:
        raise ValueError(f"{what} must be more than zero seconds, got {value!r}")
    return seconds


def _finite_seconds(value: object, what: str) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{what} must be a finite number of seconds, got {value!r}") from None
    else:
        raise TypeError(
            f"{what} must be a number of seconds or a datetime.timedelta, "
            f"got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    return seconds
