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
    schedule_subject: str | None = None,
    **publish_options: Any,
) -> PubAck:
    """Publish to JetStream a message that natsmw handlers see no earlier than ``not_before``.

    By default the message is stored at once with a ``Natsmw-Deadline`` header: consumers
    wrapped in [`with_delay_cap`][natsmw.with_delay_cap] park or hold it until then; other consumers
    see an ordinary message with one more header.

    With ``schedule_subject``, the server's own scheduler (nats-server 2.12+) keeps it instead:
    a one-shot schedule is stored on ``schedule_subject`` and the server publishes the message
    to ``subject`` at ``not_before``, so every consumer, natsmw or not, gets it then, with no
    holds at all. ``schedule_subject`` must be a literal subject of the same stream, different
    from ``subject``, that **no consumer reads**: the schedule itself is a stored message, and
    a consumer whose filter matches it receives it at once. The stream must allow message
    schedules (``allow_msg_schedules``); natsmw checks that before publishing.

    Like [`natsmw.publish`][natsmw.publish], it opens a PRODUCER span and propagates its context,
    and takes its ``claim_check=`` (a [`ClaimCheck`][natsmw.ClaimCheck]) for large bodies.

    Example:
        ```python
        await publish_not_before(js, "invoices.remind", body, not_before=timedelta(hours=3))
        await publish_not_before(js, "invoices.remind", body, not_before=timedelta(hours=3),
                                 schedule_subject="invoices.scheduled.4711")
        ```

    Whatever ``js.publish`` raises is raised as it is.

    Raises:
        TypeError, ValueError: ``not_before`` is not an aware datetime or a valid delay;
            ``schedule_subject`` is ``subject``, has wildcards, or is not in the same stream
            as ``subject``; or that stream does not allow message schedules (the message is
            not published: nothing is stored early).
    """
    deadline = deadline_header(not_before)
    merged = {**(headers or {}), **deadline}
    if schedule_subject is None:
        return await publish(js, subject, payload, headers=merged, **publish_options)
    await _check_schedulable(js, subject, schedule_subject)
    at = deadline[DEADLINE_HEADER]
    # The Natsmw-Deadline header stays: the scheduler may fire a tick early, and natsmw
    # consumers then wait out the difference.
    merged.update({"Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": subject})
    return await publish(js, schedule_subject, payload, headers=merged, **publish_options)


async def _check_schedulable(js: JetStreamContext, subject: str, schedule_subject: str) -> None:
    if schedule_subject == subject or any(token in ("*", ">") for token in
                                          schedule_subject.split(".")):  # fmt: skip
        raise ValueError(
            f"schedule_subject must be a literal subject other than {subject!r}, "
            f"got {schedule_subject!r}"
        )
    stream = await js.find_stream_name_by_subject(subject)
    if await js.find_stream_name_by_subject(schedule_subject) != stream:
        raise ValueError(
            f"schedule_subject {schedule_subject!r} must be in the stream of {subject!r} "
            f"({stream}): the server schedules only within one stream"
        )
    info = await js.stream_info(stream)
    if not info.config.allow_msg_schedules:
        raise ValueError(
            f"stream {stream!r} does not allow message schedules (allow_msg_schedules is off, "
            f"or the server is older than 2.12): publish without schedule_subject to use the "
            f"{DEADLINE_HEADER} header instead"
        )
