"""The park tier: long delays wait in the server's own scheduler, not in ack-pending.

A nak longer than the park threshold *parks* the message: natsmw stores a one-shot message
schedule (nats-server 2.12+) in its own stream, ``natsmw_parked``, carrying the original body
and headers and what natsmw knows of the message, and only once the server has confirmed it
acks the original. The original leaves the consumer's ack-pending set at once and spends no
delivery until it is due.

At the deadline the server publishes the parked copy to ``natsmw.due.<stream>.<consumer>.<seq>``
in the same stream. A durable pull consumer of natsmw's, one per original durable consumer,
hands each due message to one instance, which passes it through the same chain as a
:class:`DueMsg`: the original subject, body, headers and identity, settled on the due copy.

Layout of ``natsmw_parked`` (work-queue retention, schedules and per-message TTL on):

* ``natsmw.park.<stream>.<consumer>.<seq>``: the schedule. One per message: a re-park
  replaces it (the server rolls schedules up per subject), so a crash between storing it and
  acking the original cannot make two.
* ``natsmw.due.<stream>.<consumer>.<seq>``: the due copy, removed when acked; expires after
  the retention if nobody serves it (its consumer expires after the same time of inactivity).

Stream and consumer names never contain ``.``, ``*``, ``>`` or whitespace, so they are used
as subject tokens as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from natsmw.chain import Handler
from natsmw.delay.deadline import format_deadline
from natsmw.duration import Duration, to_positive_seconds
from natsmw.errors import ParkError

__all__ = [
    "DEFAULT_RETENTION",
    "PARKED_HEADER",
    "PARK_STREAM",
    "DueMsg",
    "Parked",
    "ParkedServing",
    "serve_parked",
]

log = logging.getLogger("natsmw.delay")

PARK_STREAM = "natsmw_parked"
"""The stream natsmw parks messages in, created on first use."""

PARKED_HEADER = "Natsmw-Parked"
"""The header of a parked copy that says, as JSON, what natsmw knows of the original."""

DEFAULT_RETENTION = 7 * 24 * 3600.0
"""How long a due message waits for a consumer that nobody serves any more (seconds)."""

_SCHEDULE = "natsmw.park"
_DUE = "natsmw.due"
# Headers of the original that would steer the server (Nats-Msg-Id, Nats-TTL,
# Nats-Expected-*...) travel renamed under this prefix, and are restored when due; a header
# that already starts with it is renamed too, so that restoring is exact.
_KEPT = "Natsmw-Park-"
# What the server adds to the due copy, not part of the original.
_SERVER_ADDED = frozenset(("Nats-Scheduler", "Nats-Schedule-Next", "Nats-TTL"))
_MIN_SCHEDULES = (2, 12)
_RETRY_UNAVAILABLE = 60.0


@dataclass(frozen=True, slots=True)
class Parked:
    """What natsmw keeps with a parked message: where it came from and where it stands.

    Attributes:
        stream, consumer, sequence: the original's stream, durable consumer and stream sequence.
        subject: the original's subject.
        deadline: Unix time before which the handler must not see it.
        calls: handler calls made for it so far.
        delivered: deliveries of it so far (the original's and earlier due copies').
        stored_at: when the original was stored (Unix time).
        requested: the delay the handler asked for (seconds).
        traceparent: the W3C traceparent of the span that asked for the delay.
    """

    stream: str
    consumer: str
    sequence: int
    subject: str
    deadline: float
    calls: int
    delivered: int
    stored_at: float
    requested: float | None = None
    traceparent: str | None = None

    def to_header(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_header(cls, value: str) -> Parked:
        """Raises ``ValueError`` when ``value`` is not a ``Natsmw-Parked`` header natsmw wrote."""
        try:
            fields = json.loads(value)
            parked = cls(**fields)
            if not (
                isinstance(parked.sequence, int)
                and isinstance(parked.calls, int)
                and isinstance(parked.delivered, int)
                and isinstance(parked.deadline, (int, float))
                and isinstance(parked.stored_at, (int, float))
                and isinstance(parked.subject, str)
            ):
                raise TypeError("a field has the wrong type")
        except (ValueError, TypeError):
            raise ValueError(
                f"not a {PARKED_HEADER} header natsmw wrote: {value[:200]!r}"
            ) from None
        return parked

    @property
    def schedule_subject(self) -> str:
        return f"{_SCHEDULE}.{self.stream}.{self.consumer}.{self.sequence}"

    @property
    def due_subject(self) -> str:
        return f"{_DUE}.{self.stream}.{self.consumer}.{self.sequence}"


class DueMsg(Msg):
    """A parked message that is due, as handlers see it.

    ``subject``, ``data`` and ``headers`` are the original's; ``metadata`` names the original
    stream, consumer and stream sequence, its stored time, and counts every delivery so far.
    Settling it (``ack``, ``nak``, ``term``) settles the due copy. ``parked`` says what natsmw
    kept with it.
    """

    parked: Parked


def due_message(copy: Msg) -> DueMsg:
    """The original behind a due copy fetched from ``natsmw_parked``.

    Raises:
        ValueError: ``copy`` has no valid ``Natsmw-Parked`` header.
    """
    headers = copy.headers or {}
    value = headers.get(PARKED_HEADER)
    if value is None:
        raise ValueError(f"{copy.subject} has no {PARKED_HEADER} header: not a parked message")
    parked = Parked.from_header(value)
    original: dict[str, str] = {}
    for name, header in headers.items():
        if name == PARKED_HEADER or name in _SERVER_ADDED:
            continue
        original[name[len(_KEPT) :] if name.startswith(_KEPT) else name] = header
    meta = copy.metadata
    due = DueMsg(
        _client=copy._client,
        subject=parked.subject,
        reply=copy.reply,
        data=copy.data,
        headers=original or None,
        _sid=copy._sid,
    )
    due._metadata = Msg.Metadata(
        sequence=Msg.Metadata.SequencePair(consumer=meta.sequence.consumer, stream=parked.sequence),
        num_pending=meta.num_pending,
        num_delivered=parked.delivered + meta.num_delivered,
        timestamp=datetime.fromtimestamp(parked.stored_at, timezone.utc),
        stream=parked.stream,
        consumer=parked.consumer,
        domain=meta.domain,
    )
    due.parked = parked
    return due


def _kept_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in (headers or {}).items():
        steering = name.startswith(("Nats-", _KEPT)) or name == PARKED_HEADER
        kept[f"{_KEPT}{name}" if steering else name] = value
    return kept


def due_consumer_name(stream: str, consumer: str) -> str:
    """The name of natsmw's consumer of the due messages of ``stream``/``consumer``.

    A digest, so that names that differ only in where a separator falls never meet.
    """
    digest = hashlib.sha256(f"{stream}\n{consumer}".encode()).hexdigest()[:24]
    return f"natsmw_due_{digest}"


class ParkStream:
    """``natsmw_parked`` on one client: created on first use, checked before it is trusted.

    Holds the client weakly: a closed client is not kept alive by natsmw.
    """

    def __init__(self, client: Client, *, retention: float, timeout: float = 2.0) -> None:
        self._client = weakref.ref(client)
        self.retention = retention
        self._timeout = timeout
        self._ready = False
        self._refused_until = 0.0
        self._reason = ""
        self._opening = asyncio.Lock()

    def _js(self) -> JetStreamContext:
        client = self._client()
        if client is None:
            raise ParkError("the client is gone")
        # Client.jetstream itself, not an install()'s wrapper: natsmw's own traffic
        # never goes through a user's chain.
        return Client.jetstream(client)

    async def ensure(self) -> None:
        """Make sure the stream exists and really schedules.

        Raises:
            ParkError: the server cannot schedule (older than 2.12, or it read the setting
                back as off), or the stream cannot be created; the reason is in the message.
                Not asked again for a minute.
        """
        if self._ready:
            return
        if time.monotonic() < self._refused_until:
            raise ParkError(self._reason)
        async with self._opening:
            if self._ready:
                return
            try:
                await self._open()
            except ParkError as error:
                self._reason = str(error)
                self._refused_until = time.monotonic() + _RETRY_UNAVAILABLE
                raise
            self._ready = True

    async def _open(self) -> None:
        client = self._client()
        version = (getattr(client, "_server_info", None) or {}).get("version", "")
        if _version(version) < _MIN_SCHEDULES:
            raise ParkError(
                f"nats-server {version or '(unknown version)'} has no message schedules "
                f"(2.12 or later needed)"
            )
        js = self._js()
        try:
            info = await asyncio.wait_for(js.stream_info(PARK_STREAM), self._timeout)
        except NotFoundError:
            info = await self._create(js)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            raise ParkError(f"cannot read stream {PARK_STREAM!r}: {error!r}") from error
        config = info.config
        if not config.allow_msg_schedules or not config.allow_msg_ttl:
            raise ParkError(
                f"stream {PARK_STREAM!r} does not schedule messages (allow_msg_schedules="
                f"{config.allow_msg_schedules}, allow_msg_ttl={config.allow_msg_ttl}): "
                f"the server does not support it, or the stream was made by someone else"
            )

    async def _create(self, js: JetStreamContext) -> Any:
        client = self._client()
        clustered = bool((getattr(client, "_server_info", None) or {}).get("cluster"))
        last: BaseException | None = None
        for replicas in [3, 1] if clustered else [1]:
            config = StreamConfig(
                name=PARK_STREAM,
                description="natsmw: parked messages (schedules) and due messages",
                subjects=[f"{_SCHEDULE}.>", f"{_DUE}.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                allow_msg_schedules=True,
                allow_msg_ttl=True,
                num_replicas=replicas,
            )
            try:
                return await js.add_stream(config, timeout=self._timeout)
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                last = error
                if replicas == 3:
                    log.warning(
                        "could not create stream %r with 3 replicas (%r); creating it with 1: "
                        "parked messages will not survive the loss of its server",
                        PARK_STREAM, error,
                    )  # fmt: skip
        raise ParkError(f"cannot create stream {PARK_STREAM!r}: {last!r}") from last

    async def park(self, parked: Parked, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Store the schedule of ``parked``; return once the server has confirmed it.

        Raises:
            ParkError: not stored (the reason is in the message); the original must be kept.
        """
        await self.ensure()
        schedule = {
            **_kept_headers(headers),
            PARKED_HEADER: parked.to_header(),
            "Nats-Schedule": f"@at {_at(parked.deadline)}",
            "Nats-Schedule-Target": parked.due_subject,
            "Nats-Schedule-TTL": f"{max(round(self.retention), 1)}s",
        }
        try:
            ack = await self._js().publish(
                parked.schedule_subject, data, headers=schedule, timeout=self._timeout
            )
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            raise ParkError(f"the schedule was not stored: {error!r}") from error
        if ack.stream != PARK_STREAM:
            raise ParkError(f"the schedule was stored in {ack.stream!r}, not {PARK_STREAM!r}")

    async def holds(self, stream: str, consumer: str, sequence: int) -> bool:
        """Whether a schedule or a due copy of this message is waiting in the stream.

        ``False`` too when the stream does not exist: then nothing was ever parked here.

        Raises:
            ParkError: the stream could not be asked.
        """
        js = self._js()
        for prefix in (_SCHEDULE, _DUE):
            try:
                await js.get_last_msg(PARK_STREAM, f"{prefix}.{stream}.{consumer}.{sequence}")
                return True
            except NotFoundError:
                continue
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                raise ParkError(f"cannot read {PARK_STREAM!r}: {error!r}") from error
        return False


def _at(moment: float) -> str:
    return format_deadline(datetime.fromtimestamp(moment, timezone.utc))


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = text.lstrip("v").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


_streams: weakref.WeakKeyDictionary[Client, ParkStream] = weakref.WeakKeyDictionary()


def park_stream(client: Client, retention: float = DEFAULT_RETENTION) -> ParkStream:
    """The :class:`ParkStream` of ``client`` (one per client)."""
    stream = _streams.get(client)
    if stream is None:
        stream = _streams[client] = ParkStream(client, retention=retention)
    return stream


# -- serving due messages ------------------------------------------------------------------

# Which original consumers have someone serving their due messages, per client: the delay cap
# parks only for those, so that nothing is parked that nobody will bring back.
_served: weakref.WeakKeyDictionary[Client, dict[tuple[str, str], int]] = weakref.WeakKeyDictionary()


def is_served(client: Client, stream: str, consumer: str) -> bool:
    """Whether this process serves the due messages of ``stream``/``consumer`` on ``client``."""
    served = _served.get(client)
    return served is not None and (stream, consumer) in served


def _register(client: Client, key: tuple[str, str]) -> None:
    served = _served.setdefault(client, {})
    served[key] = served.get(key, 0) + 1


def _unregister(client: Client, key: tuple[str, str]) -> None:
    served = _served.get(client)
    if served is None or key not in served:
        return
    served[key] -= 1
    if served[key] <= 0:
        del served[key]


class ParkedServing:
    """Serving the due messages of one durable consumer; from :func:`serve_parked`.

    ``await serving.stop()`` (or ``async with``) ends it; parking for that consumer stops with
    it in this process, unless something else serves it too.
    """

    def __init__(
        self,
        client: Client,
        handler: Handler,
        stream: str,
        consumer: str,
        *,
        manual_ack: bool,
        retention: float,
        batch: int,
        alive: Any = None,
    ) -> None:
        self.stream = stream
        self.consumer = consumer
        self._client = weakref.ref(client)
        self._handler = handler
        self._manual_ack = manual_ack
        self._retention = retention
        self._batch = batch
        self._alive = alive  # stop when this returns False (an install's subscription)
        self._key = (stream, consumer)
        self.ready = asyncio.Event()
        _register(client, self._key)
        self._task = asyncio.create_task(self._serve(), name=f"natsmw serve {stream}/{consumer}")
        self._running: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Stop serving; due messages being handled finish first."""
        client = self._client()
        if client is not None:
            _unregister(client, self._key)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def __aenter__(self) -> ParkedServing:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _gone(self) -> bool:
        client = self._client()
        if client is None or client.is_closed:
            return True
        return self._alive is not None and not self._alive()

    async def _serve(self) -> None:
        wait = 0.1
        try:
            while not self._gone():
                try:
                    psub = await self._subscribe()
                    self.ready.set()
                    wait = 0.1
                    await self._pull(psub)
                except ParkError as error:
                    log.warning("cannot serve due messages of %s/%s: %s", *self._key, error)
                except (NatsError, asyncio.TimeoutError, OSError) as error:
                    log.warning("serving due messages of %s/%s: %r; retrying", *self._key, error)
                await asyncio.sleep(wait)  # back off while the server is away
                wait = min(wait * 2, 5.0)
        finally:
            client = self._client()
            if client is not None and self._gone():
                _unregister(client, self._key)

    async def _subscribe(self) -> Any:
        client = self._client()
        if client is None:
            raise ParkError("the client is gone")
        await park_stream(client, self._retention).ensure()
        js = Client.jetstream(client)
        stream, consumer = self._key
        ack_wait: float | None = None
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(stream, consumer, timeout=2.0)
            ack_wait = info.config.ack_wait
        name = due_consumer_name(stream, consumer)
        config = ConsumerConfig(
            durable_name=name,
            description=f"natsmw: due messages of {stream}/{consumer}",
            filter_subject=f"{_DUE}.{stream}.{consumer}.>",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,  # a handler gets as long with a due copy as with the original
            max_deliver=-1,
            inactive_threshold=self._retention,
        )
        await js.add_consumer(PARK_STREAM, config, timeout=2.0)
        return await js.pull_subscribe_bind(name, PARK_STREAM)

    async def _pull(self, psub: Any) -> None:
        try:
            while not self._gone():
                try:
                    copies = await psub.fetch(self._batch, timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                await asyncio.gather(*(self._handle(copy) for copy in copies))
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _handle(self, copy: Msg) -> None:
        try:
            due = due_message(copy)
        except ValueError as error:
            log.error("terminating a message in %s that natsmw cannot read: %s", PARK_STREAM, error)
            await copy.term()
            return
        try:
            await self._handler(due)
        except Exception:
            log.exception(
                "the handler failed on due message %s seq %s; it comes back after ack_wait",
                due.subject, due.parked.sequence,
            )  # fmt: skip
            return
        if not self._manual_ack and not due._ackd:
            with contextlib.suppress(MsgAlreadyAckdError):
                await due.ack()


async def serve_parked(
    connection: Client | JetStreamContext,
    handler: Handler,
    *,
    stream: str,
    consumer: str,
    manual_ack: bool = False,
    retention: Duration = DEFAULT_RETENTION,
    batch: int = 16,
) -> ParkedServing:
    """Serve the parked messages of a durable consumer when they are due, through ``handler``.

    Use it with a decorated handler (``install(nc, chain=...)`` does it for you): pass the
    same handler the subscription calls, so that due messages go through the same chain.
    Every instance of the consumer should serve; each due message reaches one of them. A
    delay cap parks messages of ``stream``/``consumer`` only while this process serves them,
    so nothing is parked that nobody brings back.

    Example::

        await js.subscribe("orders.>", durable="worker", cb=handle)
        serving = await serve_parked(js, handle, stream="ORDERS", consumer="worker")

    Args:
        connection: the client, or a JetStream context of it.
        handler: the handler (with its chain) the consumer's messages go to.
        stream, consumer: the original stream and durable consumer.
        manual_ack: as for ``js.subscribe``: when false, a due message the handler returns
            from without settling is acked, as nats-py's auto-ack would.
        retention: how long due messages wait for a server before they expire, and how long
            natsmw's consumer of them outlives the last instance that served it.
        batch: due messages fetched, and handled concurrently, at a time.

    Raises:
        TypeError: ``handler`` is not callable.
        ValueError: ``stream`` or ``consumer`` is empty or not a valid name, ``batch`` < 1.
    """
    if not callable(handler):
        raise TypeError(f"handler must be an async message handler, got {handler!r}")
    for what, name in (("stream", stream), ("consumer", consumer)):
        if not isinstance(name, str) or not name or any(c in name for c in ".*> \t\r\n"):
            raise ValueError(f"{what} must be a JetStream {what} name, got {name!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number of at least 1, got {batch!r}")
    client = connection._nc if isinstance(connection, JetStreamContext) else connection
    return ParkedServing(
        client,
        handler,
        stream,
        consumer,
        manual_ack=manual_ack,
        retention=to_positive_seconds(retention, "retention"),
        batch=batch,
    )
