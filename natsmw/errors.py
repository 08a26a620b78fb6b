"""Every exception natsmw raises, in one place."""

from __future__ import annotations

__all__ = [
    "DeadlineStoreError",
    "DeadlinesLostError",
    "NatsmwError",
    "ParkError",
    "ServerError",
    "ServerNotFoundError",
]


class NatsmwError(Exception):
    """Base class of the errors natsmw raises itself.

    Bad arguments raise the built-in ``TypeError`` and ``ValueError`` instead, so that
    callers can catch them the way they catch any other bad argument.
    """


class ServerError(NatsmwError):
    """The embedded nats-server could not be started, or stopped, as asked."""


class ServerNotFoundError(ServerError):
    """The ``nats-server`` executable is not installed."""


class DeadlineStoreError(NatsmwError):
    """A deadline store could not be read or written (for example, the server is unreachable).

    The delay cap catches it and degrades safely (see the guide to the hold tier); custom
    stores raise it for any failure they want handled that way.
    """


class DeadlinesLostError(DeadlineStoreError):
    """The deadline store's records are gone: its bucket was deleted, or it is missing where
    a message came back to be checked. Whatever deadline the message had is unknown for good.

    The delay cap counts it (``stats.lost_deadlines``), logs an error and runs the handler:
    holding blind would never end. ``certain`` is ``False`` when the bucket is missing but
    this process never saw it: it cannot tell a deleted bucket from one never made (the
    cap then warns once, and counts nothing).
    """

    def __init__(self, message: str, *, certain: bool = True) -> None:
        super().__init__(message)
        self.certain = certain


class ParkError(NatsmwError):
    """A message could not be parked: the server has no message schedules (before 2.12), the
    park stream was refused or is unreachable, or the schedule was not stored.

    The delay cap catches it and holds the message instead, with a warning.
    """
