"""The ``Natsmw-Deadline`` header: "do not hand this message to a handler before T".

The value is an RFC 3339 timestamp; natsmw writes UTC with microseconds
(``2026-11-26T15:30:00.000000Z``) and reads any RFC 3339 offset.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import PubAck

from natsmw.duration import to_seconds
from natsmw.tracing import publish

__all__ = [
    "DEADLINE_HEADER",
    "deadline_header",
    "format_deadline",
    "parse_deadline",
    "publish_not_before",
]

DEADLINE_HEADER = "Natsmw-Deadline"


def format_deadline(when: datetime) -> str:
    """Format ``when`` as the header value: RFC 3339, UTC, microseconds.

    Raises:
        ValueError: ``when`` is naive (has no time zone): natsmw will not guess one.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"deadline must be an aware datetime (with a time zone), got {when!r}")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_deadline(value: str) -> datetime:
    """Parse a header value into an aware UTC ``datetime``.

    Raises:
        ValueError: ``value`` is not an RFC 3339 timestamp with a time zone; names the value.
    """
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"{DEADLINE_HEADER} must be an RFC 3339 timestamp such as "
            f"2026-11-26T15:30:00Z, got {value!r}"
        )
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    if zone in ("Z", "z"):
        offset = timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        when = datetime(
            int(year), int(month), int(day), int(hour), int(minute), min(int(second), 59),
            micros, tzinfo=timezone(offset),
        )  # fmt: skip
        return when.astimezone(timezone.utc)
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{DEADLINE_HEADER} is not a real time: {value!r} ({error})") from None


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})"
)


def deadline_header(not_before: datetime | float | timedelta) -> dict[str, str]:
    """The header that keeps a message from natsmw handlers until ``not_before``.

    ``not_before`` is an aware ``datetime``, or a delay from now (seconds or ``timedelta``).

    Raises:
        TypeError, ValueError: ``not_before`` is not an aware datetime or a valid delay.
    """
    if isinstance(not_before, datetime):
        return {DEADLINE_HEADER: format_deadline(not_before)}
    delay = to_seconds(not_before, "not_before delay")
    when = datetime.fromtimestamp(time.time() + delay, timezone.utc)
    return {DEADLINE_HEADER: format_deadline(when)}


async def publish_not_before(
    js: JetStreamContext,
    subject: str,
    payload: bytes = b"",
    *,
    not_before: datetime | float | timedelta,
    headers: Mapping[str, str] | None = None,
    **publish_options: Any,
) -> PubAck:
    """Publish to JetStream a message that natsmw delay caps hold until ``not_before``.

    Consumers wrapped in :func:`~natsmw.with_delay_cap` never call their handler for it
    earlier; other consumers see an ordinary message with one more header. Like
    :func:`natsmw.publish`, it opens a PRODUCER span and propagates its context.

    Example::

        await publish_not_before(js, "invoices.remind", body, not_before=timedelta(hours=3))

    Raises:
        TypeError, ValueError: ``not_before`` is not an aware datetime or a valid delay.
        Whatever ``js.publish`` raises.
    """
    merged = {**(headers or {}), **deadline_header(not_before)}
    return await publish(js, subject, payload, headers=merged, **publish_options)
