"""The park tier: long delays wait in the server's own scheduler, not in ack-pending.

A nak longer than the park threshold *parks* the message: natsmw stores a one-shot message
schedule (nats-server 2.12+) in its own stream, ``natsmw_parked``, carrying the original body
and headers and what natsmw knows of the message, and only once the server has confirmed it
acks the original. The original leaves the consumer's ack-pending set at once and spends no
delivery until it is due.

At the deadline the server publishes the parked copy to ``natsmw.due.<stream>.<consumer>...``
in the same stream. A durable pull consumer of natsmw's, one per original durable consumer,
hands each due message to one instance, which passes it through the same chain as a
[`DueMsg`][DueMsg]: the original subject, body, headers and identity, settled on the due copy.

Layout of ``natsmw_parked`` (work-queue retention, schedules and per-message TTL on):

* ``natsmw.park.<stream>.<consumer>.<seq>.<stored µs>``: the schedule. One per message (the
  store time tells a recreated stream's messages apart): a re-park replaces it (the server
  rolls schedules up per subject), so a crash between storing it and acking the original
  cannot make two.
* ``natsmw.due.<stream>.<consumer>.<seq>.<stored µs>``: the due copy, removed when acked;
  expires after the retention if nobody serves it (its consumer expires after the same time
  of inactivity).

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import APIError, NotFoundError

from natsmw.delay.clock import server_clock
from natsmw.delay.deadline import format_deadline
from natsmw.delay.stores import stream_subjects
from natsmw.errors import ParkError
from natsmw.headers import original_name, sendable_name
from natsmw.message import Position, StandInMsg

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
CLOCK_SUBJECT = f"{_SCHEDULE}.clock"  # where a probe measures this host's clock (see clock.py)
# Headers of the original that would steer the server (Nats-Msg-Id, Nats-TTL,
# Nats-Expected-*...) or that nats-py cannot send (published by another client) travel
# renamed under this prefix, and are restored when due; a header that already starts with it
# is renamed too, so that restoring is exact.
_KEPT = "Natsmw-Park-"
# What the server adds to the due copy, not part of the original.
_SERVER_ADDED = frozenset(("Nats-Scheduler", "Nats-Schedule-Next", "Nats-TTL"))
_MIN_SCHEDULES = (2, 12)
_RETRY_UNAVAILABLE = 60.0


@dataclass(frozen=True, slots=True)
class Parked:
    """What natsmw keeps with a parked message: where it came from and where it stands.

    Attributes:
        stream: the original's stream.
        consumer: the original's durable consumer.
        sequence: the original's stream sequence.
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
    def generation(self) -> str:
        """The original's store time in microseconds: with the sequence, it names one message
        even when a stream is recreated under the same name and its sequences start again."""
        return str(round(self.stored_at * 1e6))

    @property
    def schedule_subject(self) -> str:
        return schedule_subject(self.stream, self.consumer, self.sequence, self.stored_at)

    @property
    def due_subject(self) -> str:
        return f"{_DUE}.{self.stream}.{self.consumer}.{self.sequence}.{self.generation}"


def schedule_subject(stream: str, consumer: str, sequence: int, stored_at: float) -> str:
    """The subject of the schedule of one message: one per message, so a re-park replaces."""
    return f"{_SCHEDULE}.{stream}.{consumer}.{sequence}.{round(stored_at * 1e6)}"


class DueMsg(StandInMsg):
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
    original = restored_headers(headers)
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
    due.original = Position(
        parked.stream, parked.consumer, parked.sequence, parked.delivered + meta.num_delivered
    )
    return due


def restored_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The original's headers, from those of its schedule or due copy (``None``: it had none).

    Every ``Nats-*`` header of the original travels renamed, so a bare one was added on the
    way (the schedule's, the scheduler's, a message id) and is not the original's.
    """
    original: dict[str, str] = {}
    for name, header in headers.items():
        if name == PARKED_HEADER or name in _SERVER_ADDED or name.startswith("Nats-"):
            continue
        original[original_name(name[len(_KEPT) :]) if name.startswith(_KEPT) else name] = header
    return original or None


def _kept_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in (headers or {}).items():
        sendable = sendable_name(name)
        steering = name.startswith(("Nats-", _KEPT)) or name == PARKED_HEADER
        kept[f"{_KEPT}{sendable}" if steering or sendable != name else name] = value
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
        self.created = asyncio.Event()  # set once this process has made or found the stream

    async def exists(self) -> bool:
        """Whether ``natsmw_parked`` exists on the server (without making it)."""
        if self._ready:
            return True
        try:
            await asyncio.wait_for(self._js().stream_info(PARK_STREAM), self._timeout)
        except (NatsError, asyncio.TimeoutError, OSError, ParkError):
            return False
        return True

    async def measure_clock(self) -> None:
        """Measure this host's clock against the server's (see
        [`natsmw.delay.clock`][natsmw.delay.clock]), if it is due and the stream is ready."""
        client = self._client()
        if client is not None and self._ready and server_clock.stale(client):
            await server_clock.measure(client, self._js(), PARK_STREAM, CLOCK_SUBJECT)

    @property
    def ready(self) -> bool:
        """Whether this process has made or found the stream, and checked it."""
        return self._ready

    @property
    def refused(self) -> bool:
        """Whether the stream was found unusable less than a minute ago."""
        return time.monotonic() < self._refused_until

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
            self.created.set()
        await self.measure_clock()

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
                allow_direct=True,  # natsmw.ops lists it a thousand messages per request
                num_replicas=replicas,
            )
            try:
                return await asyncio.wait_for(js.add_stream(config), self._timeout)
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
        if parked.deadline > LATEST_SCHEDULE:
            raise ParkError(
                f"the deadline {parked.deadline!r} is past what the server can schedule"
            )
        await self.ensure()
        schedule = {
            **_kept_headers(headers),
            PARKED_HEADER: parked.to_header(),
            "Nats-Schedule": f"@at {_at(parked.deadline)}",
            "Nats-Schedule-Target": parked.due_subject,
            "Nats-Schedule-TTL": f"{max(round(self.retention), 1)}s",
        }
        client = self._client()
        limit = getattr(client, "max_payload", 0) or 0
        size = len(data) + sum(len(k) + len(v) + 4 for k, v in schedule.items()) + 16
        if limit and size > limit:
            # nats-py checks only the body, and the server closes the connection for good.
            raise ParkError(f"the schedule would be {size} bytes, over max_payload {limit}")
        # An id the server deduplicates on: if the answer to a publish is lost, the same
        # publish again either stores it or is told it already has (never stores two).
        schedule["Nats-Msg-Id"] = (
            "natsmw-park-" + hashlib.sha256(schedule[PARKED_HEADER].encode()).hexdigest()[:32]
        )
        js = self._js()
        try:
            try:
                ack = await js.publish(
                    parked.schedule_subject, data, headers=schedule, timeout=self._timeout
                )
            except (NatsError, asyncio.TimeoutError):
                ack = await js.publish(
                    parked.schedule_subject, data, headers=schedule, timeout=self._timeout
                )
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            if await self._stored(parked):
                return  # only the answers were lost
            raise ParkError(
                f"the schedule was not confirmed stored, twice: {error!r} (if the server "
                f"stores it late, the message may run twice)"
            ) from error
        if ack.stream != PARK_STREAM:
            raise ParkError(f"the schedule was stored in {ack.stream!r}, not {PARK_STREAM!r}")

    async def _stored(self, parked: Parked) -> bool:
        """Whether this very schedule is in the stream (a publish whose answer was lost)."""
        try:
            found = await self._js().get_last_msg(PARK_STREAM, parked.schedule_subject)
        except (NatsError, asyncio.TimeoutError, OSError):
            return False
        return (found.headers or {}).get(PARKED_HEADER) == parked.to_header()

    async def sequences(self, stream: str, consumer: str) -> set[int]:
        """The stream sequences of ``stream``/``consumer`` with a schedule or a due copy
        waiting here, of any store time, from stream info (however many there are); an empty
        set when the stream does not exist.

        Raises:
            ParkError: the stream could not be asked.
        """
        found: set[int] = set()
        for prefix in (_SCHEDULE, _DUE):
            head = f"{prefix}.{stream}.{consumer}."
            subjects = await stream_subjects(
                self._js(), PARK_STREAM, f"{head}*.*",
                self._timeout,  # a page of 100,000 takes a fraction of it
                lambda why: ParkError(f"cannot list {PARK_STREAM!r}: {why}"),
            )  # fmt: skip
            if subjects is None:
                return found  # no park stream: nothing was ever parked
            for subject in subjects:
                sequence = subject[len(head) :].partition(".")[0]
                if sequence.isdigit():
                    found.add(int(sequence))
        return found

    async def holds(
        self, stream: str, consumer: str, sequence: int, stored_at: float, *, due: bool = True
    ) -> bool:
        """Whether a schedule or a due copy of this very message (the same store time, so not
        one of an earlier stream of the same name) is waiting in the stream.

        ``False`` too when the stream does not exist: then nothing was ever parked here.

        Raises:
            ParkError: the stream could not be asked.
        """
        js = self._js()
        token = f"{stream}.{consumer}.{sequence}.{round(stored_at * 1e6)}"
        for prefix in (_SCHEDULE, _DUE) if due else (_SCHEDULE,):
            try:
                found = await js.get_last_msg(PARK_STREAM, f"{prefix}.{token}")
            except NotFoundError:
                continue
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                raise ParkError(f"cannot read {PARK_STREAM!r}: {error!r}") from error
            value = (found.headers or {}).get(PARKED_HEADER)
            try:
                if value is not None and Parked.from_header(value).stored_at == stored_at:
                    return True
            except ValueError:
                pass  # not natsmw's: someone published there by hand
        return False


# The server keeps schedule times as nanoseconds in an int64: it cannot schedule past 2262.
LATEST_SCHEDULE = datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp()


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
    """The [`ParkStream`][ParkStream] of ``client`` (one per client)."""
    stream = _streams.get(client)
    if stream is None:
        stream = _streams[client] = ParkStream(client, retention=retention)
    return stream


# -- serving due messages ------------------------------------------------------------------

# Who serves the due messages of which original consumers, per client (by id, the entry going
# with the client: read on every long delay). Per consumer: [servers that want to serve, of
# them those whose pull works]. The delay cap parks only when one works, so that nothing is
# parked that nobody brings back; while they only want to, it makes the park stream for them.
_served: dict[int, dict[tuple[str, str], list[int]]] = {}


UNSERVED, WANTED, SERVED = 0, 1, 2


def serving(client: Client, stream: str, consumer: str) -> int:
    """How this process serves the due messages of ``stream``/``consumer``: ``SERVED`` (a
    pull of them works right now), ``WANTED`` (something wants to serve them and may be
    waiting for the park stream to exist) or ``UNSERVED``."""
    served = _served.get(id(client))
    counts = None if served is None else served.get((stream, consumer))
    if counts is None:
        return UNSERVED
    return SERVED if counts[1] > 0 else WANTED


def is_served(client: Client, stream: str, consumer: str) -> bool:
    """Whether this process pulls the due messages of ``stream``/``consumer`` right now."""
    return serving(client, stream, consumer) == SERVED


def _count(client: Client, key: tuple[str, str], which: int, step: int) -> None:
    served = _served.get(id(client))
    if served is None:
        if step < 0:
            return
        served = _served[id(client)] = {}
        weakref.finalize(client, _served.pop, id(client), None)
    counts = served.setdefault(key, [0, 0])
    counts[which] = max(counts[which] + step, 0)
    if counts[0] == 0:
        del served[key]


class _Registration:
    """One server's place in ``_served``: it wants to serve from creation until closed, and
    works while its pull does."""

    def __init__(self, client: Client, key: tuple[str, str]) -> None:
        self._client = weakref.ref(client)
        self._key = key
        self._working = False
        self._open = True
        _count(client, key, 0, +1)

    def working(self, working: bool) -> None:
        client = self._client()
        if client is None or not self._open or working == self._working:
            return
        self._working = working
        _count(client, self._key, 1, +1 if working else -1)

    def close(self) -> None:
        self.working(False)
        client = self._client()
        if client is not None and self._open:
            _count(client, self._key, 0, -1)
        self._open = False


_servings: set[ParkedServing] = set()  # running: asyncio keeps only weak references to tasks


async def stop_serving(client: Client) -> None:
    """Stop every [`ParkedServing`][ParkedServing] of ``client``; due messages being handled
    finish."""
    mine = [serving for serving in _servings if serving._client() is client]
    await asyncio.gather(*(serving.stop() for serving in mine), return_exceptions=True)


class ParkedServing:
    """Serving the due messages of one durable consumer; from [`serve_parked`][serve_parked].

    ``await serving.stop()`` (or ``async with``) ends it; parking for that consumer stops with
    it in this process, unless something else serves it too.
    """

    def __init__(
        self,
        client: Client,
        handler: Callable[[Msg], Awaitable[None]],
        stream: str,
        consumer: str,
        *,
        manual_ack: bool,
        retention: float,
        concurrency: int,
        alive: Any = None,
    ) -> None:
        self.stream = stream
        self.consumer = consumer
        self._client = weakref.ref(client)
        self._handler = handler
        self._manual_ack = manual_ack
        self._retention = retention
        self._concurrency = concurrency
        self._alive = alive  # stop when this returns False (an install's subscription)
        _servings.add(self)
        self._key = (stream, consumer)
        self._registration = _Registration(client, self._key)
        self.ready = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name=f"natsmw serve {stream}/{consumer}")
        self._task.add_done_callback(self._done)
        self._running: set[asyncio.Task[None]] = set()
        self._handling: float | None = None  # seconds a handler run takes, on average

    async def stop(self) -> None:
        """Stop serving; due messages being handled finish first."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def __aenter__(self) -> ParkedServing:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _done(self, task: asyncio.Task[None]) -> None:
        _servings.discard(self)

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
                    puller = await due_subscription(
                        self._client, *self._key, self._retention, alive=self._alive
                    )
                    if puller is None:
                        return  # not a durable consumer: nothing of it is ever parked
                    self._served(True)
                    self.ready.set()
                    wait = 0.1
                    await self._pull(puller)
                except ParkError as error:
                    self._served(False)
                    if not self._gone():  # not worth a word when the subscription just ended
                        log.warning("cannot serve due messages of %s/%s: %s", *self._key, error)
                except (NatsError, asyncio.TimeoutError, OSError) as error:
                    self._served(False)
                    log.warning(
                        "serving due messages of %s/%s: %r; retrying (meanwhile its long "
                        "delays are held, not parked)", *self._key, error,
                    )  # fmt: skip
                except Exception:
                    # Serving must outlive any surprise: a parked message nobody serves is lost.
                    self._served(False)
                    log.exception("serving due messages of %s/%s failed; retrying", *self._key)
                await asyncio.sleep(wait)  # back off while the server is away
                wait = min(wait * 2, 5.0)
        finally:
            self._registration.close()

    def _served(self, serving: bool) -> None:
        """Say whether this process's pull works: the delay cap parks only while it does."""
        self._registration.working(serving)
        if not serving:
            self.ready.clear()

    async def _pull(self, puller: DuePuller) -> None:
        """Keep up to ``concurrency`` due messages in the handler; pull only what can start at
        once (a message that waited here would spend its ack_wait, then go elsewhere too)."""
        try:
            while not self._gone():
                free = self._concurrency - len(self._running)
                if free <= 0:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for copy in await puller.pull(free, wait=1.0, ask=self._ask(puller.ack_wait)):
                    task = asyncio.create_task(self._handle(copy))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        finally:
            await puller.close()

    def _ask(self, ack_wait: float) -> int:
        """How many due messages to ask for at once: as many as the handler gets through in a
        tenth of ack_wait (by its average so far), so that none waits here long enough to be
        sent to another instance too; one until that is known."""
        if self._handling is None:
            return self._concurrency
        fits = int(ack_wait * 0.1 * self._concurrency / max(self._handling, 1e-4))
        return max(self._concurrency, min(fits, _MOST_ASKED))

    async def _handle(self, copy: Msg) -> None:
        due = await _readable(copy)
        if due is None:
            return
        started = time.monotonic()
        try:
            await self._handler(due)
        except Exception:
            log.exception(
                "the handler failed on due message %s seq %s; it comes back after ack_wait",
                due.subject, due.parked.sequence,
            )  # fmt: skip
            return
        finally:
            took = time.monotonic() - started
            self._handling = took if self._handling is None else 0.8 * self._handling + 0.2 * took
        if not self._manual_ack and not due._ackd:
            with contextlib.suppress(MsgAlreadyAckdError):
                await due.ack()


_WAIT_FOR_STREAM = 10.0
_MOST_ASKED = 64


class _NoParkStream(ParkError):
    """``natsmw_parked`` does not exist (yet): nothing was ever parked on this server."""


async def due_subscription(
    client_ref: weakref.ReferenceType[Client],
    stream: str,
    consumer: str,
    retention: float,
    *,
    wait_for_stream: bool = True,
    alive: Callable[[], bool] | None = None,
) -> Any:
    """A pull subscription to the due messages of ``stream``/``consumer``, on natsmw's
    durable consumer of them; ``None`` if the original consumer is not durable.

    Waits for ``natsmw_parked`` to exist (made by whichever process parks first) rather than
    create it, while ``alive()`` says the subscription it serves still exists: a service
    that never parks never gets the stream.

    Raises:
        ParkError, nats.errors.Error: the server could not be asked (the caller retries).
    """
    client = client_ref()
    if client is None or client.is_closed:
        raise ParkError("the client is closed")
    # First whether there is anything to serve: an ephemeral or ordered consumer never parks.
    info = await Client.jetstream(client).consumer_info(stream, consumer, timeout=2.0)
    if not info.config.durable_name:
        return None
    while True:
        client = client_ref()
        if client is None or client.is_closed:
            raise ParkError("the client is closed")
        if alive is not None and not alive():
            raise ParkError("the subscription is gone")
        parks = park_stream(client, retention)
        js = Client.jetstream(client)
        try:
            await asyncio.wait_for(js.stream_info(PARK_STREAM), 2.0)
            break
        except NotFoundError:
            if not wait_for_stream:
                raise _NoParkStream(f"no stream {PARK_STREAM!r} yet") from None
        del client, js
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(parks.created.wait(), _WAIT_FOR_STREAM)
    name = due_consumer_name(stream, consumer)
    config = ConsumerConfig(
        durable_name=name,
        description=f"natsmw: due messages of {stream}/{consumer}",
        filter_subject=f"{_DUE}.{stream}.{consumer}.>",
        ack_policy=AckPolicy.EXPLICIT,
        # A handler gets as long with a due copy as with the original.
        ack_wait=info.config.ack_wait,
        # As many deliveries again as the original allows: a poison message stays bounded.
        max_deliver=info.config.max_deliver or -1,
        inactive_threshold=retention,
    )
    try:
        await js.add_consumer(PARK_STREAM, config, timeout=2.0)
    except APIError as error:
        # Made by another instance with another config (the original's ack_wait changed
        # since): serve from it as it is rather than not at all.
        try:
            await js.consumer_info(PARK_STREAM, name, timeout=2.0)
        except NotFoundError:
            raise error from None
        log.info("serving due messages of %s/%s from the existing %s (%s)",
                 stream, consumer, name, error)  # fmt: skip
    puller = DuePuller(client, js._prefix, name, ack_wait=info.config.ack_wait or 30.0)
    await puller.open()
    return puller


class DuePuller:
    """Pulls from natsmw's consumer of due messages with a callback subscription of its own.

    Not nats-py's ``fetch``: it leaves what it takes unfinished in the subscription's queue,
    and the client's ``drain()`` then waits its whole timeout (30 s) for it. A callback
    subscription is drained like any other, and a pull request's late answers are kept for
    the next pull instead of being lost.
    """

    def __init__(self, client: Client, prefix: str, consumer: str, *, ack_wait: float) -> None:
        self.ack_wait = ack_wait
        self._client = client
        self._next = f"{prefix}.CONSUMER.MSG.NEXT.{PARK_STREAM}.{consumer}"
        self._inbox = client.new_inbox()
        self._taken: list[Msg] = []
        self._answered = asyncio.Event()
        self._failure: str | None = None
        self._sub: Any = None

    async def open(self) -> None:
        # Client.subscribe itself, not an install()'s wrapper: natsmw's own traffic never
        # goes through a user's chain.
        self._sub = await Client.subscribe(self._client, self._inbox, cb=self._received)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()

    async def _received(self, msg: Msg) -> None:
        # A message has an ack subject; a status line (404, 408, 409) has none. Not
        # is_status_msg(): a message of the user's may carry a header named Status.
        if not (msg.reply or "").startswith("$JS.ACK."):
            status = JetStreamContext.is_status_msg(msg)
            if status not in ("404", "408"):  # not "no messages" nor "request expired"
                headers = msg.headers or {}
                self._failure = f"{status} {headers.get('Description', '')}".strip()
            self._answered.set()
            return
        self._taken.append(msg)
        self._answered.set()  # hand it over at once; the rest of the batch follows

    async def pull(self, batch: int, wait: float | None, *, ask: int | None = None) -> list[Msg]:
        """Up to ``batch`` due messages: those there are now (``wait`` None), or waiting up to
        ``wait`` seconds for the first. When none are kept from an earlier request, ask the
        server for ``ask`` (default ``batch``): the rest are kept for the next pulls."""
        if not self._taken:
            batch_asked = ask or batch
            self._answered.clear()
            request: dict[str, Any] = {"batch": batch_asked}
            if wait is None:
                request["no_wait"] = True
            else:
                request["expires"] = int(wait * 1e9)
            await self._client.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._answered.wait(), (wait or 0.0) + 1.0)
        failure, self._failure = self._failure, None
        if failure is not None and not self._taken:
            # No responders (the consumer or the stream was deleted), consumer deleted...:
            # the pull no longer works. Said, so that serving starts again from scratch.
            raise ParkError(f"the pull of due messages was answered {failure or 'with an error'}")
        taken, self._taken = self._taken[:batch], self._taken[batch:]
        return taken


class DueFetcher:
    """Due messages for a pull subscription made under ``install``: its ``fetch`` returns
    them along with the consumer's own messages. Registers the consumer as served while the
    subscription lives."""

    _POLL = 0.25

    def __init__(self, client: Client, stream: str, consumer: str) -> None:
        self._client = weakref.ref(client)
        self._key = (stream, consumer)
        self._puller: DuePuller | None = None
        self._next_poll = 0.0
        self._durable = True
        self._registration = _Registration(client, self._key)

    def close(self) -> None:
        self._registration.close()
        self._durable = False

    async def aclose(self) -> None:
        """Stop taking due messages, and unsubscribe natsmw's pull of them."""
        self.close()
        puller, self._puller = self._puller, None
        if puller is not None:
            await puller.close()

    async def take(self, batch: int) -> list[DueMsg]:
        """Due messages, at most ``batch``; asks the server at most every 250 ms when none
        are waiting. Never raises: a failure is logged, and asked again later."""
        now = time.monotonic()
        if not self._durable:
            return []
        client = self._client()
        waiting_for_stream = self._puller is None and client is not None
        just_created = waiting_for_stream and park_stream(client).created.is_set()  # type: ignore[arg-type]
        if now < self._next_poll and not just_created:
            return []
        self._next_poll = now + self._POLL
        try:
            if self._puller is None:
                self._puller = await asyncio.wait_for(
                    due_subscription(
                        self._client, *self._key, DEFAULT_RETENTION, wait_for_stream=False
                    ),
                    2.0,
                )
                if self._puller is None:
                    self.close()  # an ephemeral consumer: never parked, nothing to take
                    return []
            self._registration.working(True)
            copies = await self._puller.pull(batch, wait=None)
        except _NoParkStream:
            self._next_poll = now + _WAIT_FOR_STREAM / 2  # nothing was ever parked here
            return []
        except (NatsError, ParkError, OSError, asyncio.TimeoutError) as error:
            log.warning(
                "cannot fetch due messages of %s/%s: %r (meanwhile its long delays are held, "
                "not parked)", *self._key, error,
            )  # fmt: skip
            self._registration.working(False)
            puller, self._puller = self._puller, None  # subscribe again next time
            if puller is not None:
                await puller.close()
            self._next_poll = now + 5.0
            return []
        if not copies:
            return []
        self._next_poll = 0.0  # there may be more
        readable = [await _readable(copy) for copy in copies]
        return [due for due in readable if due is not None]


_UNREADABLE_NAK = 3600.0


async def _readable(copy: Msg) -> DueMsg | None:
    """The due message behind ``copy``; ``None`` (and ``copy`` naked for an hour, for an
    operator to look at, never dropped) when natsmw did not write it."""
    try:
        return due_message(copy)
    except ValueError as error:
        log.error(
            "%s in %s was not written by natsmw (%s): it is left there, naked for %.0fs",
            copy.subject, PARK_STREAM, error, _UNREADABLE_NAK,
        )  # fmt: skip
        with contextlib.suppress(NatsError):
            await copy.nak(delay=_UNREADABLE_NAK)
        return None


async def serve_parked(
    connection: Client | JetStreamContext,
    handler: Callable[[Msg], Awaitable[None]],
    *,
    stream: str,
    consumer: str,
    manual_ack: bool = False,
    concurrency: int = 1,
) -> ParkedServing:
    """Serve the parked messages of a durable consumer when they are due, through ``handler``.

    Use it with a decorated handler (``install(nc, chain=...)`` does it for you): pass the
    same handler the subscription calls, so that due messages go through the same chain.
    Every instance of the consumer should serve; each due message reaches one of them. A
    delay cap parks messages of ``stream``/``consumer`` only while this process serves them,
    so nothing is parked that nobody brings back.

    Example:
        ```python
        await js.subscribe("orders.>", durable="worker", cb=handle)
        serving = await serve_parked(js, handle, stream="ORDERS", consumer="worker")
        ```

    Args:
        connection: the client, or a JetStream context of it.
        handler: the handler (with its chain) the consumer's messages go to.
        stream, consumer: the original stream and durable consumer.
        manual_ack: as for ``js.subscribe``: when false, a due message the handler returns
            from without settling is acked, as nats-py's auto-ack would.
        concurrency: due messages handled at once. 1, the default, handles them one after
            the other, as nats-py calls a subscription's callback.

    Raises:
        TypeError: ``handler`` is not callable.
        ValueError: ``stream`` or ``consumer`` is empty or not a valid name, the consumer does
            not exist or is not durable (nothing of it is ever parked), or ``concurrency`` < 1.
        nats.errors.Error: the consumer's info could not be read.
    """
    if not callable(handler):
        raise TypeError(f"handler must be an async message handler, got {handler!r}")
    for what, name in (("stream", stream), ("consumer", consumer)):
        if not isinstance(name, str) or not name or any(c in name for c in ".*> \t\r\n"):
            raise ValueError(f"{what} must be a JetStream {what} name, got {name!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
    client = connection._nc if isinstance(connection, JetStreamContext) else connection
    try:
        info = await Client.jetstream(client).consumer_info(stream, consumer, timeout=2.0)
    except NotFoundError:
        raise ValueError(
            f"no consumer {consumer!r} on stream {stream!r}: serve_parked needs the durable "
            f"consumer the handler reads (subscribe first, then serve)"
        ) from None
    if not info.config.durable_name:
        raise ValueError(
            f"{stream}/{consumer} is not a durable consumer: nothing of it is ever parked "
            f"(it may be gone before a deadline), so there is nothing to serve"
        )
    serving = ParkedServing(
        client,
        handler,
        stream,
        consumer,
        manual_ack=manual_ack,
        retention=DEFAULT_RETENTION,
        concurrency=concurrency,
    )
    # Asked to serve: make the park stream now, and return once the pull works, so that the
    # first long delay is parked rather than held.
    try:
        await park_stream(client).ensure()
    except ParkError as error:
        log.warning("long delays of %s/%s will be held, not parked: %s", stream, consumer, error)
        return serving
    try:
        await asyncio.wait_for(serving.ready.wait(), 5.0)
    except asyncio.TimeoutError:
        log.warning(
            "serving due messages of %s/%s does not work yet: its long delays are held, "
            "not parked, until it does", stream, consumer,
        )  # fmt: skip
    return serving
