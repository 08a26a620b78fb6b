"""Warnings that an outage or a stuck message would repeat on every delivery, said at most
once every few seconds per kind, with a count of those held back."""

from __future__ import annotations

import logging
import time

__all__ = ["Throttled"]


class Throttled:
    """A logger's warnings, at most one per ``kind`` every ``every`` seconds."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._said: dict[str, tuple[float, int]] = {}  # kind: (quiet until, held back)

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a message of ``kind`` was logged less than
        ``every`` seconds ago; the next one that is logged says how many were held back."""
        self._say(logging.WARNING, kind, message, args)

    def error(self, kind: str, message: str, *args: object) -> None:
        """As [`warning`][warning], at the ``ERROR`` level."""
        self._say(logging.ERROR, kind, message, args)

    def _say(self, level: int, kind: str, message: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        until, held = self._said.get(kind, (0.0, 0))
        if now < until:
            self._said[kind] = (until, held + 1)
            return
        self._said[kind] = (now + self._every, 0)
        if held:
            message += " (and %d more like it in the last %.0fs)"
            args = (*args, held, self._every)
        self._log.log(level, message, *args)
