"""Operate deferred messages: what ``natsmw deferred`` runs (list, show, release, cancel).

natsmw keeps two kinds of deferred messages on the server, and this module reads both:

* **held**: the message stays with its consumer, which natsmw naks for at most the cap until
  its deadline; the deadline is a record in the key-value bucket ``natsmw_deadlines``, keyed
  ``<stream>.<consumer>.<sequence>``.
* **parked**: the original was acked; a one-shot schedule in the stream ``natsmw_parked``
  carries it until its deadline. **due**: the schedule fired and the copy waits in
  ``natsmw_parked`` for an instance of its consumer to handle it (a due copy that stays is a
  stranded consumer).

Listing streams what it reads (batched direct gets, a thousand messages per request), so its
memory does not grow with the number of deferred messages.

Releasing makes a message due now: a parked one fires at once, a held one runs at its next
delivery once the holding instance has seen its consumer's change marker move (it reads the
marker every `RECHECK_HELD` seconds, then the records it holds). Cancelling means it will
never run: a schedule or due copy is deleted (the original was acked when it was parked), a
held one is terminated at its next delivery. Neither reaches into a handler already running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NotFoundError

from natsmw.delay.clock import server_clock
from natsmw.delay.park import (
    CLOCK_SUBJECT,
    PARK_STREAM,
    PARKED_HEADER,
    Parked,
    restored_headers,
)
from natsmw.delay.stores import CLOCK_KEY, RECHECK_HELD, DeadlineKey, Deferral, changes_key
from natsmw.errors import NatsmwError

__all__ = [
    "RECHECK_HELD",
    "ConsumerSummary",
    "DeferredGauges",
    "DeferredMessage",
    "NotFound",
    "OpsError",
    "Shown",
    "cancel",
    "deferred",
    "release",
    "show",
    "summarize",
]

Tier = Literal["held", "parked", "due"]

DEADLINE_BUCKET = "natsmw_deadlines"
log = logging.getLogger("natsmw.ops")
_API = "$JS.API"
_BATCH = 1000
_TIMEOUT = 10.0
_MARKER_TTL = 7 * 24 * 3600  # gone after a week unchanged: holders then read records once


class OpsError(NatsmwError):
    """An operation on deferred messages failed: the message says why (no permission, the
    server cannot be read)."""


class NotFound(OpsError):
    """What was named does not exist: a stream, a consumer, a deferred message, or any natsmw
    data on this server."""


@dataclass(frozen=True, slots=True)
class DeferredMessage:
    """One deferred message, as natsmw keeps it on the server.

    Attributes:
        tier: ``held`` (naked until its deadline), ``parked`` (in the server's scheduler) or
            ``due`` (parked, fired, not handled yet).
        stream: the original's stream.
        consumer: the original's durable consumer.
        sequence: the original's stream sequence.
        deadline: Unix time before which its handler must not run.
        subject: the original's subject, where natsmw kept it (``None`` for records written
            before natsmw kept it).
        handler_calls: handler calls made for it so far.
        deliveries: deliveries spent on it so far, where known (parked messages); for a
            held message, the delivery whose handler deferred it.
        requested: the delay the handler asked for, in seconds (``None``: a publisher's
            deadline).
        trace_id: the trace of the span that deferred it, if it was traced.
    """

    tier: Tier
    stream: str
    consumer: str
    sequence: int
    deadline: float
    subject: str | None
    handler_calls: int
    deliveries: int | None
    requested: float | None
    trace_id: str | None

    def due_in(self, now: float | None = None) -> float:
        """Seconds until the deadline; negative once overdue."""
        return self.deadline - (time.time() if now is None else now)

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready dict: the fields, the deadline also as RFC 3339, and ``due_in``."""
        fields = asdict(self)
        fields["deadline_utc"] = _utc(self.deadline)
        fields["due_in"] = round(self.due_in(now), 3)
        return fields


@dataclass(slots=True)
class ConsumerSummary:
    """Deferred messages of one consumer, by tier, and when the next is due."""

    stream: str
    consumer: str
    held: int = 0
    parked: int = 0
    due: int = 0
    next_deadline: float | None = None  # the earliest deadline still ahead
    oldest_overdue: float | None = None  # the earliest deadline already passed

    def add(self, message: DeferredMessage, now: float) -> None:
        if message.tier == "held":
            self.held += 1
        elif message.tier == "parked":
            self.parked += 1
        else:
            self.due += 1
        if message.deadline > now:
            if self.next_deadline is None or message.deadline < self.next_deadline:
                self.next_deadline = message.deadline
        elif self.oldest_overdue is None or message.deadline < self.oldest_overdue:
            self.oldest_overdue = message.deadline

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready dict, with ``overdue_for``: seconds since the oldest overdue deadline."""
        fields = asdict(self)
        now = time.time() if now is None else now
        fields["overdue_for"] = (
            None if self.oldest_overdue is None else round(now - self.oldest_overdue, 3)
        )
        return fields


@dataclass(frozen=True, slots=True)
class Shown:
    """One deferred message in full: what [`show`][natsmw.ops.show] returns.

    Attributes:
        message: the deferred message.
        headers: the original's headers (``None``: it has none, or it is gone).
        body_size: the original's body size in bytes (``None``: it is gone from its stream).
        record: natsmw's record of it: the deadline record of a held message, the
            ``Natsmw-Parked`` header of a parked one.
    """

    message: DeferredMessage
    headers: dict[str, str] | None
    body_size: int | None
    record: dict[str, Any] = field(default_factory=dict)


async def deferred(
    nc: Client,
    *,
    stream: str | None = None,
    consumer: str | None = None,
    bucket: str = DEADLINE_BUCKET,
) -> AsyncIterator[DeferredMessage]:
    """Every deferred message on the server, held ones first, streamed as they are read.

    Held records of messages their consumer has acked since (at or below its ack floor),
    of consumers that no longer exist, and released ones are left out.

    Raises:
        NotFound: ``stream`` or ``consumer`` does not exist, or the server has no natsmw data
            (neither the deadline bucket nor the park stream).
        OpsError: the server cannot be read (no permission, unavailable).
    """
    if consumer is not None and stream is None:
        raise ValueError("a consumer is named within its stream: give the stream too")
    if stream is not None:
        await _stream_info(nc, stream)
        if consumer is not None:
            await _consumer_info(nc, stream, consumer)
    has_bucket = await _exists(nc, f"KV_{bucket}")
    has_parked = await _exists(nc, PARK_STREAM)
    if not has_bucket and not has_parked:
        raise NotFound(
            f"no natsmw data on this server: neither the deadline bucket {bucket!r} nor the "
            f"stream {PARK_STREAM!r} exists (nothing was ever deferred here)"
        )
    if has_bucket:
        floors: dict[tuple[str, str], int | None] = {}
        pattern = f"$KV.{bucket}.{_key_token(stream)}.{_key_token(consumer)}.*"
        async for copy in _scan(nc, f"KV_{bucket}", pattern):
            held = _held(copy, bucket)
            if held is None:
                continue
            group = (held.stream, held.consumer)
            if group not in floors:
                floors[group] = await _ack_floor(nc, *group)
            floor = floors[group]
            if floor is not None and held.sequence > floor:
                yield held
    if has_parked:
        for kind in ("park", "due"):
            pattern = f"natsmw.{kind}.{stream or '*'}.{consumer or '*'}.*.*"
            async for copy in _scan(nc, PARK_STREAM, pattern):
                parked = _parked(copy)
                if parked is not None:
                    yield parked


async def summarize(
    messages: AsyncIterator[DeferredMessage], now: float | None = None
) -> list[ConsumerSummary]:
    """One [`ConsumerSummary`][natsmw.ops.ConsumerSummary] per consumer, in the order first
    seen (memory grows with consumers, not messages)."""
    now = time.time() if now is None else now
    summaries: dict[tuple[str, str], ConsumerSummary] = {}
    async for message in messages:
        group = (message.stream, message.consumer)
        summary = summaries.get(group)
        if summary is None:
            summary = summaries[group] = ConsumerSummary(*group)
        summary.add(message, now)
    return list(summaries.values())


async def show(
    nc: Client, stream: str, consumer: str, sequence: int, *, bucket: str = DEADLINE_BUCKET
) -> Shown:
    """One deferred message: its record or schedule, and the original's headers and size.

    Raises:
        NotFound: the stream or consumer does not exist, or the message is not deferred.
        OpsError: the server cannot be read.
    """
    await _consumer_info(nc, stream, consumer)
    message, copy, _, record = await _find(nc, stream, consumer, sequence, bucket)
    if message.tier == "held":
        original = await _stream_message(nc, stream, sequence)
        headers = None if original is None else original.headers
        size = None if original is None else len(original.data)
    else:
        headers = restored_headers(copy.headers or {})
        size = len(copy.data)
    return Shown(message, headers, size, record)


async def release(
    nc: Client, stream: str, consumer: str, sequence: int, *, bucket: str = DEADLINE_BUCKET
) -> DeferredMessage:
    """Make a deferred message due now; return it as it was before.

    A parked one fires at once (its schedule is rewritten to now), a due one is left as it
    is, and a held one runs at its next delivery after the holding instance reads its record
    again (within `RECHECK_HELD` seconds plus the cap).

    Raises:
        NotFound: the stream or consumer does not exist, or the message is not deferred (or
            it fired, or was handled, meanwhile).
        OpsError: the server refused the change.
    """
    return await _change(nc, stream, consumer, sequence, bucket, cancel=False)


async def cancel(
    nc: Client, stream: str, consumer: str, sequence: int, *, bucket: str = DEADLINE_BUCKET
) -> DeferredMessage:
    """Make sure a deferred message never runs; return it as it was before.

    A parked or due one is deleted from ``natsmw_parked`` (its original was acked when it
    was parked); a held one is terminated (``term``) at its next delivery after the holding
    instance reads its record again, and its consumer never delivers it again. Its original
    stays in its stream for the stream's other consumers.

    Raises:
        NotFound: as for [`release`][natsmw.ops.release].
        OpsError: the server refused the change.
    """
    return await _change(nc, stream, consumer, sequence, bucket, cancel=True)


class DeferredGauges:
    """Gauges of deferred messages per stream, for monitoring: an alert on
    ``natsmw.deferred.oldest_overdue`` fires on stranded parked messages.

    A background task lists the server's deferred messages (as [`deferred`][natsmw.ops.deferred]
    does) every ``every`` seconds and keeps the counts; the gauges report the last ones:

    * ``natsmw.deferred.messages`` (``natsmw.stream.name``, ``natsmw.delay.tier``): deferred
      messages by tier (``held``, ``parked``, ``due``);
    * ``natsmw.deferred.oldest_overdue`` (``natsmw.stream.name``, seconds): how long ago the
      oldest deadline still unhandled passed; 0 when none has.

    A listing that fails keeps the last counts and logs a warning. Use it as
    ``async with DeferredGauges(nc, meter_provider=...)``, or call ``start`` and ``stop``.
    """

    def __init__(self, nc: Client, *, every: float = 60.0, meter_provider: Any = None) -> None:
        from opentelemetry import metrics

        self._nc = nc
        self._every = every
        self._counts: dict[tuple[str, str], int] = {}
        self._overdue: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.refreshed = asyncio.Event()
        meter = metrics.get_meter("natsmw", meter_provider=meter_provider)
        meter.create_observable_gauge(
            "natsmw.deferred.messages", [self._observe_counts], unit="{message}",
            description="Deferred messages, by stream and tier (held, parked, due).",
        )  # fmt: skip
        meter.create_observable_gauge(
            "natsmw.deferred.oldest_overdue", [self._observe_overdue], unit="s",
            description="Time since the oldest unhandled deadline passed, by stream.",
        )  # fmt: skip

    async def refresh(self) -> None:
        """List the deferred messages once and keep the counts.

        Raises:
            OpsError: the server cannot be read (``NotFound`` is no error here: nothing is
                deferred).
        """
        counts: dict[tuple[str, str], int] = {}
        oldest: dict[str, float] = {}
        now = time.time()
        try:
            async for message in deferred(self._nc):
                group = (message.stream, message.tier)
                counts[group] = counts.get(group, 0) + 1
                if message.deadline <= now:
                    oldest[message.stream] = max(oldest.get(message.stream, 0.0),
                                                 now - message.deadline)  # fmt: skip
                else:
                    oldest.setdefault(message.stream, 0.0)
        except NotFound:
            pass
        # Streams that had deferred messages and have none now report 0, not silence.
        for stream, tier in self._counts:
            counts.setdefault((stream, tier), 0)
            oldest.setdefault(stream, 0.0)
        self._counts, self._overdue = counts, oldest
        self.refreshed.set()

    async def start(self) -> None:
        """Refresh now, then every ``every`` seconds in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the background refreshes."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            # On Python 3.10 and 3.11, asyncio.wait_for may swallow a cancel that lands as
            # its request is answered (nats-py's request is one): cancel until it stops.
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)

    async def __aenter__(self) -> DeferredGauges:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.refreshed.clear()
            try:
                await self.refresh()
            except OpsError as error:
                log.warning("natsmw.deferred gauges keep their last values: %s", error)

    def _observe_counts(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for (stream, tier), count in self._counts.items():
            yield Observation(count, {"natsmw.stream.name": stream, "natsmw.delay.tier": tier})

    def _observe_overdue(self, options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        for stream, seconds in self._overdue.items():
            yield Observation(round(seconds, 3), {"natsmw.stream.name": stream})


# -- reading ---------------------------------------------------------------------------------


async def _scan(
    nc: Client, stream: str, pattern: str, *, max_bytes: int | None = None
) -> AsyncIterator[Msg]:
    """The messages of ``stream`` on subjects matching ``pattern``, in order, a batch of
    direct gets at a time (of at most ``max_bytes``, if given); one ``STREAM.MSG.GET`` at a
    time where the stream does not allow direct gets (natsmw's own streams do, from this
    version).

    Raises:
        OpsError: the stream did not answer in time, or answered with an error.
    """
    batch: list[Msg] = []
    ended = asyncio.Event()

    async def collect(answer: Msg) -> None:
        # A callback, not next_msg(): a third of the cost per message at 100k.
        batch.append(answer)
        if answer.headers and "Status" in answer.headers:
            ended.set()  # the end of the batch, or an error: the last answer of a request

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        sequence = 1
        while True:
            batch.clear()
            ended.clear()
            request: dict[str, Any] = {"seq": sequence, "next_by_subj": pattern, "batch": _BATCH}
            if max_bytes is not None:
                request["max_bytes"] = max_bytes
            await nc.publish(f"{_API}.DIRECT.GET.{stream}", json.dumps(request).encode(),
                             reply=inbox)  # fmt: skip
            try:
                await asyncio.wait_for(ended.wait(), _TIMEOUT)
            except asyncio.TimeoutError:
                raise OpsError(f"cannot read {stream!r}: no answer in {_TIMEOUT:.0f}s") from None
            *found, last = batch
            status = (last.headers or {}).get("Status")
            if status == "503" and not found:  # no responders: direct gets are off here
                async for copy in _scan_one_by_one(nc, stream, pattern, sequence):
                    yield copy
                return
            if status not in ("204", "404"):
                raise OpsError(f"cannot read {stream!r}: status {status} {last.headers}")
            for copy in found:
                headers = copy.headers or {}
                sequence = int(headers["Nats-Sequence"]) + 1
                # A direct get answers on the inbox: the message's own subject is a header.
                yield Msg(_client=nc, subject=headers["Nats-Subject"], data=copy.data,
                          headers=headers)  # fmt: skip
            if status == "404" or not found or (last.headers or {}).get("Nats-Num-Pending") == "0":
                return
    finally:
        with contextlib.suppress(NatsError):  # the connection may be closed already
            await sub.unsubscribe()


async def _scan_one_by_one(
    nc: Client, stream: str, pattern: str, sequence: int
) -> AsyncIterator[Msg]:
    while True:
        found = await _msg_get(nc, stream, {"seq": sequence, "next_by_subj": pattern})
        if found is None:
            return
        copy, sequence = found
        sequence += 1
        yield copy


async def _msg_get(nc: Client, stream: str, request: Mapping[str, Any]) -> tuple[Msg, int] | None:
    """``STREAM.MSG.GET``: the message found and its sequence, or ``None``."""
    answer = await _api(nc, f"STREAM.MSG.GET.{stream}", request)
    if "error" in answer:
        if answer["error"].get("code") == 404:
            return None
        raise OpsError(f"cannot read {stream!r}: {answer['error'].get('description')}")
    raw = answer["message"]
    headers = None
    if raw.get("hdrs"):
        headers = _parse_headers(base64.b64decode(raw["hdrs"]))
    copy = Msg(
        _client=nc,
        subject=raw["subject"],
        data=base64.b64decode(raw.get("data") or b""),
        headers=headers,
    )
    return copy, int(raw["seq"])


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode(errors="replace").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


async def _api(nc: Client, subject: str, request: Mapping[str, Any] | None = None) -> Any:
    body = b"" if request is None else json.dumps(request).encode()
    try:
        reply = await nc.request(f"{_API}.{subject}", body, timeout=_TIMEOUT)
    except NoRespondersError:
        raise OpsError(
            f"no JetStream on this server or account ({_API}.{subject} has no responders)"
        ) from None
    except (NatsError, asyncio.TimeoutError) as error:
        raise OpsError(f"{_API}.{subject}: {error!r}") from None
    if (reply.headers or {}).get("Status") == "503":
        raise OpsError(f"JetStream is unavailable ({_API}.{subject})")
    try:
        return json.loads(reply.data)
    except ValueError:
        raise OpsError(f"{_API}.{subject} answered {reply.data[:200]!r}") from None


def _api_error(answer: Mapping[str, Any], what: str) -> None:
    error = answer.get("error")
    if error is None:
        return
    if error.get("code") == 404:
        raise NotFound(f"{what} does not exist ({error.get('description')})")
    raise OpsError(f"{what}: {error.get('description')} (code {error.get('code')})")


async def _stream_info(nc: Client, stream: str) -> Any:
    answer = await _api(nc, f"STREAM.INFO.{stream}")
    _api_error(answer, f"stream {stream!r}")
    return answer


async def _consumer_info(nc: Client, stream: str, consumer: str) -> Any:
    await _stream_info(nc, stream)
    answer = await _api(nc, f"CONSUMER.INFO.{stream}.{consumer}")
    _api_error(answer, f"consumer {consumer!r} of stream {stream!r}")
    return answer


async def _exists(nc: Client, stream: str) -> bool:
    answer = await _api(nc, f"STREAM.INFO.{stream}")
    if "error" not in answer:
        return True
    if answer["error"].get("code") == 404:
        return False
    _api_error(answer, f"stream {stream!r}")
    return False


async def _ack_floor(nc: Client, stream: str, consumer: str) -> int | None:
    """The consumer's ack floor (stream sequence), or ``None`` when it does not exist."""
    answer = await _api(nc, f"CONSUMER.INFO.{stream}.{consumer}")
    if "error" in answer:
        if answer["error"].get("code") == 404:
            return None
        _api_error(answer, f"consumer {consumer!r} of stream {stream!r}")
    floor: int = (answer.get("ack_floor") or {}).get("stream_seq", 0)
    return floor


async def _stream_message(nc: Client, stream: str, sequence: int) -> Msg | None:
    found = await _msg_get(nc, stream, {"seq": sequence})
    return None if found is None else found[0]


def _held(copy: Msg, bucket: str) -> DeferredMessage | None:
    headers = copy.headers or {}
    if headers.get("KV-Operation") in ("DEL", "PURGE") or not copy.data:
        return None
    key = _key_of(copy.subject, bucket)
    if key is None:
        return None
    try:
        deferral = Deferral.from_bytes(copy.data)
    except ValueError:
        return None
    if deferral.released_at is not None or deferral.cancelled:
        return None  # handled, or cancelled: it will not run as a deferred message
    return _held_message(key, deferral)


def _held_message(key: DeadlineKey, deferral: Deferral) -> DeferredMessage:
    return DeferredMessage(
        tier="held",
        stream=key.stream,
        consumer=key.consumer,
        sequence=key.sequence,
        deadline=deferral.deadline,
        subject=deferral.subject,
        handler_calls=deferral.calls_before + deferral.deferred_at - deferral.skipped_before,
        deliveries=deferral.deferred_at,
        requested=deferral.requested,
        trace_id=_trace_id(deferral.traceparent),
    )


def _parked(copy: Msg) -> DeferredMessage | None:
    value = (copy.headers or {}).get(PARKED_HEADER)
    if value is None:
        return None
    try:
        parked = Parked.from_header(value)
    except ValueError:
        return None
    return _parked_message(parked, "due" if copy.subject.startswith("natsmw.due.") else "parked")


def _parked_message(parked: Parked, tier: Tier) -> DeferredMessage:
    return DeferredMessage(
        tier=tier,
        stream=parked.stream,
        consumer=parked.consumer,
        sequence=parked.sequence,
        deadline=parked.deadline,
        subject=parked.subject,
        handler_calls=parked.calls,
        deliveries=parked.delivered,
        requested=parked.requested,
        trace_id=_trace_id(parked.traceparent),
    )


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


_ESCAPED = re.compile(r"(?:=[0-9a-f]{2})+")


def _unescape(token: str) -> str:
    return _ESCAPED.sub(lambda match: bytes.fromhex(match[0].replace("=", "")).decode(), token)


def _key_token(name: str | None) -> str:
    return "*" if name is None else DeadlineKey(name, "", 0).as_kv_key().split(".")[0]


def _key_of(subject: str, bucket: str) -> DeadlineKey | None:
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[1] != bucket or not tokens[4].isdigit():
        return None
    return DeadlineKey(_unescape(tokens[2]), _unescape(tokens[3]), int(tokens[4]))


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# -- changing ----------------------------------------------------------------------------------


async def _find(
    nc: Client, stream: str, consumer: str, sequence: int, bucket: str
) -> tuple[DeferredMessage, Msg, int, dict[str, Any]]:
    """The message's record, wherever natsmw keeps it, and the copy it was read from with
    that copy's sequence in its stream."""
    if await _exists(nc, PARK_STREAM):
        for kind in ("park", "due"):
            pattern = f"natsmw.{kind}.{stream}.{consumer}.{sequence}.*"
            found = await _msg_get(nc, PARK_STREAM, {"seq": 1, "next_by_subj": pattern})
            if found is not None:
                message = _parked(found[0])
                if message is not None:
                    header = (found[0].headers or {})[PARKED_HEADER]
                    return message, found[0], found[1], json.loads(header)
    if await _exists(nc, f"KV_{bucket}"):
        key = DeadlineKey(stream, consumer, sequence)
        subject = f"$KV.{bucket}.{key.as_kv_key()}"
        found = await _msg_get(nc, f"KV_{bucket}", {"last_by_subj": subject})
        if found is not None:
            message = _held(found[0], bucket)
            floor = await _ack_floor(nc, stream, consumer)
            if message is not None and floor is not None and sequence > floor:
                return message, found[0], found[1], json.loads(found[0].data)
    raise NotFound(f"{stream}/{consumer} message {sequence} is not deferred")


async def _change(
    nc: Client, stream: str, consumer: str, sequence: int, bucket: str, *, cancel: bool
) -> DeferredMessage:
    await _consumer_info(nc, stream, consumer)
    message, copy, at, _ = await _find(nc, stream, consumer, sequence, bucket)
    js = nc.jetstream()
    if message.tier == "held":
        deferral = Deferral.from_bytes(copy.data)
        # "Now" as the server tells it: deadlines are compared in its time, and this host's
        # clock may be ahead (a release would wait out the difference).
        await server_clock.measure(nc, js, f"KV_{bucket}", f"$KV.{bucket}.{CLOCK_KEY}")
        now = server_clock.now(nc)
        changed = replace(deferral, cancelled=True) if cancel else replace(deferral, deadline=now)
        ttl = max(changed.deadline - now, 0.0) + 24 * 3600
        what = f"the record of {stream}/{consumer} {sequence}"
        await _replace(js, copy.subject, changed.to_bytes(), {}, at, what, msg_ttl=ttl)
        # Then the consumer's change marker: holding instances read it (one read per
        # consumer every RECHECK_HELD seconds), and read their held records again when it
        # moved, not every record every time.
        marker = f"$KV.{bucket}.{changes_key(stream, consumer)}"
        token = uuid.uuid4().hex.encode()  # a new value each time, whatever the revision
        try:
            await js.publish(marker, token, timeout=_TIMEOUT, msg_ttl=_MARKER_TTL)
        except (NatsError, asyncio.TimeoutError) as error:
            raise OpsError(
                f"{what} is changed, but the consumer's change marker {marker} could not be "
                f"written ({error!r}; no answer can mean no permission to publish there): "
                f"the instance holding the message sees the change only when it comes due"
            ) from None
        return message
    if cancel:
        await _delete(js, at)
        if message.tier == "parked":  # it may have fired meanwhile: its due copy goes too
            pattern = f"natsmw.due.{stream}.{consumer}.{sequence}.*"
            due = await _msg_get(nc, PARK_STREAM, {"seq": 1, "next_by_subj": pattern})
            if due is not None:
                await _delete(js, due[1])
        return message
    if message.tier == "due":
        return message  # due already: the next fetch of its consumer gets it
    parked = Parked.from_header((copy.headers or {})[PARKED_HEADER])
    await server_clock.measure(nc, js, PARK_STREAM, CLOCK_SUBJECT)
    now = server_clock.now(nc)  # a schedule @at this host's "now" would fire late if ahead
    released = replace(parked, deadline=now)
    headers = {
        name: value
        for name, value in (copy.headers or {}).items()
        if not name.startswith(("Nats-Expected-", "Nats-Msg-Id"))
    }
    headers[PARKED_HEADER] = released.to_header()
    headers["Nats-Schedule"] = f"@at {_utc(now)}"
    # the schedule's own subject: a re-publish there replaces it
    what = f"the schedule of {stream}/{consumer} {sequence}"
    await _replace(js, copy.subject, copy.data, headers, at, what)
    return message


async def _replace(
    js: Any,
    subject: str,
    data: bytes,
    headers: dict[str, str],
    at: int,
    what: str,
    **options: Any,
) -> None:
    """Publish ``data`` to ``subject`` in place of its message at sequence ``at`` only (a
    compare-and-set: one that changed or fired meanwhile is left as it is).

    Raises:
        OpsError: it changed meanwhile, or cannot be written.
    """
    headers = {**headers, "Nats-Expected-Last-Subject-Sequence": str(at)}
    try:
        await js.publish(subject, data, headers=headers, timeout=_TIMEOUT, **options)
    except APIError as error:
        raise OpsError(f"{what} changed (or fired) meanwhile, or cannot be written: "
                       f"{error.description}") from None  # fmt: skip
    except (NatsError, asyncio.TimeoutError) as error:
        raise OpsError(f"cannot write {what}: {error!r}") from None


async def _delete(js: Any, sequence: int) -> None:
    try:
        await js.delete_msg(PARK_STREAM, sequence)
    except NotFoundError:
        pass  # gone meanwhile: handled, or deleted by someone else
    except APIError as error:
        if error.code != 404:
            raise OpsError(f"cannot delete message {sequence} of {PARK_STREAM!r}: "
                           f"{error.description}") from None  # fmt: skip
    except (NatsError, asyncio.TimeoutError) as error:
        raise OpsError(f"cannot delete message {sequence} of {PARK_STREAM!r}: {error!r}") from None
