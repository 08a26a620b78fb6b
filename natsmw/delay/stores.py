"""Where deadlines live when the message itself cannot carry them.

A nak never changes a message's headers, so a deadline asked for with ``nak(delay)`` is kept
outside the message, keyed by stream, consumer and stream sequence. The default store is a
JetStream key-value bucket on the consumer's own connection: durable, shared by every instance
of the same durable consumer, created on first use, its entries expiring on their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol, TypeVar

from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from natsmw.delay.clock import server_clock
from natsmw.duration import Duration, to_positive_seconds
from natsmw.errors import DeadlinesLostError, DeadlineStoreError

__all__ = [
    "RECHECK_HELD",
    "DeadlineKey",
    "DeadlineStore",
    "Deferral",
    "KeyValueDeadlineStore",
    "MemoryDeadlineStore",
    "replaces",
]

log = logging.getLogger("natsmw.delay")
_T = TypeVar("_T")
_RECHECK = 30.0

RECHECK_HELD = 30.0
"""How often (seconds) an instance holding messages looks for an operator's release or cancel
(``natsmw deferred``): one read of the consumer's change marker, and of the held records only
if it moved. The change takes effect at the message's first delivery after that."""
_WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed expected-last-sequence


class DeadlineKey(NamedTuple):
    """Which message a deferral belongs to: stream, durable consumer, stream sequence."""

    stream: str
    consumer: str
    sequence: int

    def as_kv_key(self) -> str:
        """``<stream>.<consumer>.<sequence>``, with characters a KV key refuses escaped."""
        return f"{_escape(self.stream)}.{_escape(self.consumer)}.{self.sequence}"


CLOCK_KEY = "natsmw-clock"
"""The key a clock probe writes in a deadline bucket (see `natsmw.delay.clock`)."""


def changes_key(stream: str, consumer: str) -> str:
    """The key whose revision counts operators' changes to a consumer's held records: four
    tokens, so that no listing of records (three) takes it for one."""
    return f"natsmw-changed.{_escape(stream)}.{_escape(consumer)}.ops"


def _escape(name: str) -> str:
    return _UNSAFE.sub(lambda match: "".join(f"={byte:02x}" for byte in match[0].encode()), name)


_UNSAFE = re.compile(r"[^-_a-zA-Z0-9]")


@dataclass(frozen=True, slots=True)
class Deferral:
    """A deadline recorded for one message, and the delivery counts around it.

    Attributes:
        deadline: Unix time (seconds) before which the handler must not see the message.
        deferred_at: the delivery (``num_delivered``) whose handler asked for the delay;
            0 when a publisher set the deadline before the first delivery.
        skipped_before: deliveries natsmw held, without calling the handler, before this
            deferral.
        released_at: the first delivery that reached the handler after the deadline, once
            known.
        requested: the delay the handler asked for, in seconds (``None`` for a header).
        stored_at: when the stream stored the message (Unix time), to tell a record from
            one left by an earlier stream or consumer of the same name.
        traceparent: the W3C traceparent of the span that asked for the delay, so that the
            handler's run after the deadline can link back to it.
        consumer_created: when the consumer that recorded it was created (Unix time): the
            delivery counts above are that consumer generation's.
        calls_before: handler calls made under earlier consumers of the same name.
        subject: the message's subject, for operators (``natsmw deferred list``).
        cancelled: an operator cancelled it (``natsmw deferred cancel``): the next delivery
            that reads this record terminates the message instead of running the handler.
    """

    deadline: float
    deferred_at: int = 0
    skipped_before: int = 0
    released_at: int | None = None
    requested: float | None = None
    stored_at: float | None = None
    traceparent: str | None = None
    consumer_created: float | None = None
    calls_before: int = 0
    subject: str | None = None
    cancelled: bool = False

    def skipped(self, delivery: int) -> int:
        """How many deliveries up to ``delivery`` natsmw held instead of calling the handler."""
        last_hold = (self.released_at if self.released_at is not None else delivery) - 1
        return self.skipped_before + max(last_hold - self.deferred_at, 0)

    def in_generation(self, created: float | None) -> Deferral:
        """This deferral as seen by the consumer generation created at ``created``.

        Recorded by an earlier consumer of the same name (deleted and made again), its
        deadline still stands, but its delivery counts are not this consumer's: like a
        publisher's deadline, it holds from the first delivery.
        """
        if created is None or self.consumer_created in (None, created):
            return self
        last_delivery = self.released_at if self.released_at is not None else self.deferred_at
        return Deferral(
            deadline=self.deadline,
            requested=self.requested,
            stored_at=self.stored_at,
            traceparent=self.traceparent,
            consumer_created=created,
            # The calls that consumer made: its deliveries up to the last call, less holds.
            calls_before=self.calls_before + last_delivery - self.skipped(last_delivery),
            subject=self.subject,
            cancelled=self.cancelled,
        )

    def fits(self, delivery: int, stored_at: float) -> bool:
        """Whether this record can be about the message at ``delivery``, stored at ``stored_at``."""
        return (
            self.deferred_at < delivery
            and (self.released_at is None or self.released_at <= delivery)
            and (self.stored_at is None or self.stored_at == stored_at)
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Deferral:
        """Raises ``ValueError`` when ``data`` is not a deferral natsmw wrote."""
        try:
            fields = json.loads(data)
            deferral = cls(
                deadline=_number(fields["deadline"]),
                deferred_at=_count(fields.get("deferred_at", 0)),
                skipped_before=_count(fields.get("skipped_before", 0)),
                released_at=_optional(_count, fields.get("released_at")),
                requested=_optional(_number, fields.get("requested")),
                stored_at=_optional(_number, fields.get("stored_at")),
                traceparent=_optional(_text, fields.get("traceparent")),
                consumer_created=_optional(_number, fields.get("consumer_created")),
                calls_before=_count(fields.get("calls_before", 0)),
                subject=_optional(_text, fields.get("subject")),
                cancelled=fields.get("cancelled", False) is True,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"not a natsmw deferral record: {data[:100]!r}") from error
        return deferral


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count, got {value!r}")
    return value


def _optional(convert: Callable[[object], _T], value: object) -> _T | None:
    return None if value is None else convert(value)


class DeadlineStore(Protocol):
    """Keeps deferrals, keyed by [`DeadlineKey`][DeadlineKey]. Implementations raise
    `DeadlineStoreError` when they cannot answer."""

    async def get(self, key: DeadlineKey) -> Deferral | None:
        """The deferral recorded for ``key``, or ``None``."""
        ...

    async def put(self, key: DeadlineKey, deferral: Deferral) -> None:
        """Record ``deferral`` for ``key``, replacing any earlier one.

        A *release* (``released_at`` set) is written in the background and may land late:
        it must replace only the record of the same deferral (same ``deadline`` and
        ``deferred_at``), never a later deferral another instance recorded meanwhile, or that
        deferral's deadline is lost. See [`replaces`][replaces].
        """
        ...


def replaces(release: Deferral, current: Deferral | None) -> bool:
    """Whether ``release`` (a record with ``released_at``) may replace ``current``: only the
    record of the deferral it releases, or no record at all."""
    return current is None or (
        current.deadline == release.deadline and current.deferred_at == release.deferred_at
    )


class MemoryDeadlineStore:
    """A store in this process's memory: for tests and single-process consumers.

    Deferrals are lost when the process exits, and other processes never see them. Like the
    key-value store's entries, each is forgotten ``keep_after_deadline`` after its deadline.
    """

    def __init__(self, *, keep_after_deadline: Duration = 24 * 3600) -> None:
        self._deferrals: dict[DeadlineKey, Deferral] = {}
        self._keep = to_positive_seconds(keep_after_deadline, "keep_after_deadline")
        self._puts = 0

    def __len__(self) -> int:
        return len(self._deferrals)

    async def get(self, key: DeadlineKey) -> Deferral | None:
        return self._deferrals.get(key)

    async def put(self, key: DeadlineKey, deferral: Deferral) -> None:
        if deferral.released_at is not None and not replaces(deferral, self._deferrals.get(key)):
            return  # a later deferral is recorded: the release of an earlier one came late
        self._deferrals[key] = deferral
        self._puts += 1
        if self._puts % 1024 == 0:  # now and then: O(1) per put on average
            expired = time.time() - self._keep
            for old in [k for k, d in self._deferrals.items() if d.deadline < expired]:
                del self._deferrals[old]


async def stream_subjects(
    js: JetStreamContext,
    stream: str,
    subjects_filter: str,
    timeout: float,
    failed: Callable[[str], Exception],
) -> list[str] | None:
    """The subjects of ``stream`` that match ``subjects_filter``, from stream info, page after
    page (the server answers with at most 100,000 at a time; no consumer is made); ``None``
    when the stream does not exist.

    Raises:
        Exception: ``failed(why)``, when the server cannot be asked or refuses.
    """
    found: list[str] = []
    while True:
        request = {"subjects_filter": subjects_filter, "offset": len(found)}
        try:
            reply = await js._nc.request(
                f"{js._prefix}.STREAM.INFO.{stream}", json.dumps(request).encode(), timeout=timeout
            )
            answer = json.loads(reply.data)
        except (NatsError, asyncio.TimeoutError, OSError, ValueError) as error:
            raise failed(repr(error)) from error
        if "error" in answer:
            if answer["error"].get("code") == 404:
                return None
            raise failed(str(answer["error"].get("description")))
        subjects = (answer.get("state") or {}).get("subjects") or {}
        found.extend(subjects)
        if not subjects or len(found) >= answer.get("total", 0):
            return found


class KeyValueDeadlineStore:
    """Deferrals in a JetStream key-value bucket, shared by every consumer instance.

    Args:
        js: the JetStream context to use (usually the consumer's own connection's).
        bucket: the bucket's name; created on first use if missing.
        replicas: the bucket's replicas when natsmw creates it; by default 3 on a cluster
            and 1 on a single server.
        timeout: how long one read or write may take before the store counts as unreachable.
        retry_after: once unreachable, how long reads and writes fail at once, without
            asking the server (a circuit breaker): an outage costs one ``timeout``, not one
            per message.
        keep_after_deadline: how long an entry outlives its deadline before it expires on
            its own (the handler's call count, see ``handler_calls``, is read from it).
        domain: the JetStream domain ``js`` was made for, if any: a write the server stores
            in another domain is refused (a record there would never be found).

    The bucket is created by the first `put`, never by a `get`. An existing
    bucket is checked when opened: it must allow per-message TTL.

    Raises (from `get` and `put`):
        DeadlinesLostError: (from `get`) the bucket does not exist, or was deleted.
        DeadlineStoreError: the bucket cannot be reached, created, read or written, or was
            made without per-message TTL (the message says what to change).
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        bucket: str = "natsmw_deadlines",
        replicas: int | None = None,
        timeout: Duration = 2.0,
        retry_after: Duration = 5.0,
        keep_after_deadline: Duration = 24 * 3600,
        domain: str | None = None,
    ) -> None:
        self._js = js
        self._domain = domain
        self.bucket = bucket
        self._replicas = replicas
        self._timeout = to_positive_seconds(timeout, "timeout")
        self._retry_after = to_positive_seconds(retry_after, "retry_after")
        self._broken_until = 0.0  # monotonic
        self._broken: DeadlineStoreError | None = None
        self._keep = to_positive_seconds(keep_after_deadline, "keep_after_deadline")
        self._kv: KeyValue | None = None
        self._opening = asyncio.Lock()
        self._created: float | None = None
        self._vanished = False  # open once, then its stream was gone
        self._refusal: DeadlineStoreError | None = None  # writes refused: no TTL allowed
        self._recheck_at = 0.0

    async def get(self, key: DeadlineKey) -> Deferral | None:
        self._fail_fast()
        kv = await self._bucket(create=False)
        await self.measure_clock()
        try:
            entry = await asyncio.wait_for(kv.get(key.as_kv_key()), self._timeout)
        except KeyNotFoundError:
            await self._same_bucket()
            return None
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self._forget_if_gone(error)
            raise self._failed(f"cannot read {key} from {self.bucket!r}", error) from error
        if not entry.value:
            return None
        try:
            return Deferral.from_bytes(entry.value)
        except ValueError as error:
            log.warning("ignoring a bad deadline record for %s in %r: %s", key, self.bucket, error)
            return None

    async def changes(self, stream: str, consumer: str) -> str:
        """What an operator last changed in held records of ``stream``/``consumer``
        (``natsmw deferred release|cancel``): a token of the consumer's change marker, its
        revision and the random value each change writes; ``""`` if never.

        Raises:
            DeadlineStoreError: the bucket cannot be read.
        """
        self._fail_fast()
        kv = await self._bucket(create=False)
        try:
            entry = await asyncio.wait_for(kv.get(changes_key(stream, consumer)), self._timeout)
        except KeyNotFoundError:
            return ""
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self._forget_if_gone(error)
            raise self._failed(f"cannot read {self.bucket!r}", error) from error
        # The value too: a bucket deleted and made again restarts its revisions.
        return f"{entry.revision}:{(entry.value or b'').decode('ascii', 'replace')}"

    async def put(self, key: DeadlineKey, deferral: Deferral) -> None:
        self._fail_fast()
        kv = await self._bucket(create=True)
        await self._writable()
        ttl = max(deferral.deadline - time.time(), 0.0) + self._keep
        subject = f"$KV.{self.bucket}.{key.as_kv_key()}"
        headers = None
        if deferral.released_at is not None:
            # Compare and set: a late release never replaces a later deferral.
            revision = await self._revision_to_release(kv, key, deferral)
            if revision is None:
                return
            headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        try:
            # A put with a per-message TTL: the entry disappears on its own, so records of
            # messages that were handled, deleted or moved never pile up.
            ack = await self._js.publish(
                subject, deferral.to_bytes(), timeout=self._timeout, msg_ttl=ttl, headers=headers
            )
        except APIError as error:
            if headers is not None and error.err_code == _WRONG_LAST_SEQUENCE:
                return  # another record was written meanwhile: it stands
            raise self._failed(f"cannot write {key} to {self.bucket!r}", error) from error
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self._forget_if_gone(error)
            raise self._failed(f"cannot write {key} to {self.bucket!r}", error) from error
        if self._domain is not None and ack.domain != self._domain:
            # Key-value writes go to $KV.<bucket>, which the client's own domain answers.
            raise DeadlineStoreError(
                f"the record of {key} was stored in JetStream domain {ack.domain!r}, not in "
                f"{self._domain!r} where its consumer is: pass a store that writes there"
            )

    async def _revision_to_release(
        self, kv: KeyValue, key: DeadlineKey, release: Deferral
    ) -> int | None:
        """The revision a release may replace (0: no record), or ``None``: leave it be."""
        try:
            entry = await asyncio.wait_for(kv.get(key.as_kv_key()), self._timeout)
        except KeyNotFoundError:
            return 0
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self._forget_if_gone(error)
            raise self._failed(f"cannot read {key} from {self.bucket!r}", error) from error
        try:
            current = Deferral.from_bytes(entry.value) if entry.value else None
        except ValueError:
            return None
        if current is None or not replaces(release, current) or entry.revision is None:
            return None
        return entry.revision

    async def sequences(self, stream: str, consumer: str) -> set[int]:
        """The stream sequences with a record for ``stream``/``consumer``: the bucket's
        subjects for that consumer, from stream info (no consumer is made: a watch would leave
        one behind for a while per listing, and a busy service would hit the stream's
        consumer limit), however many there are.

        Raises:
            DeadlinesLostError: the bucket does not exist.
            DeadlineStoreError: it cannot be read.
        """
        await self._bucket(create=False)
        prefix = f"$KV.{self.bucket}.{_escape(stream)}.{_escape(consumer)}."
        where = f"cannot list the records of {stream}/{consumer} in {self.bucket!r}"
        subjects = await stream_subjects(
            self._js, f"KV_{self.bucket}", f"{prefix}*", max(self._timeout, 30.0),
            lambda why: DeadlineStoreError(f"{where}: {why}"),
        )  # fmt: skip
        if subjects is None:
            self._kv = None
            raise self._lost("does not exist")
        # natsmw's keys; anything else put there is not
        return {int(key) for subject in subjects if (key := subject[len(prefix) :]).isdigit()}

    async def measure_clock(self, *, create: bool = False) -> None:
        """Measure this host's clock against the server's (see `natsmw.delay.clock`)
        with a probe entry, if it is due. ``create``: make the bucket first if missing (a
        write into it follows anyway); otherwise a missing bucket is not measured with.
        Never raises."""
        client = getattr(self._js, "_nc", None)
        if client is None or not server_clock.stale(client):
            return
        try:
            await self._bucket(create=create)
        except DeadlineStoreError:
            return
        subject = f"$KV.{self.bucket}.{CLOCK_KEY}"
        await server_clock.measure(client, self._js, f"KV_{self.bucket}", subject)

    @property
    def client_closed(self) -> bool:
        """Whether the client this store writes through is closed."""
        client = getattr(self._js, "_nc", None)
        return bool(getattr(client, "is_closed", False))

    @property
    def created_at(self) -> float | None:
        """When the bucket was created (Unix time, the server's clock), once it is open.

        A record cannot be older than its bucket: a message stored before the bucket existed
        and deferred before that has lost its record (the bucket was deleted and made again).
        """
        return self._created

    async def _same_bucket(self) -> None:
        """After a miss: make sure the bucket is still the one opened. One deleted, or deleted
        and made again under us, has lost every record it had.

        Raises:
            DeadlinesLostError: it was deleted, or deleted and made again.
        """
        # A get from a deleted bucket answers "no such key", as a plain miss does: every
        # miss asks (a redelivery without a record costs one more request).
        try:
            info = await asyncio.wait_for(self._js.stream_info(f"KV_{self.bucket}"), self._timeout)
        except NotFoundError:
            self._kv = None
            self._vanished = True
            raise self._lost("was deleted") from None
        except (NatsError, asyncio.TimeoutError, OSError):
            return  # cannot tell now; the next miss asks again
        created = info.created.timestamp() if info.created is not None else None
        if self._created is not None and created is not None and created != self._created:
            self._created = created
            log.error(
                "the deadline bucket %r was deleted and made again while in use: the "
                "deadlines recorded in it are lost, and held messages may run early",
                self.bucket,
            )
            raise self._lost("was deleted and made again")

    async def _writable(self) -> None:
        """Refuse a write into a bucket without per-message TTL (reads work there)."""
        if self._refusal is None:
            return
        if time.monotonic() >= self._recheck_at:
            # An operator may fix it without restarting anything: look again.
            self._recheck_at = time.monotonic() + _RECHECK
            try:
                info = await asyncio.wait_for(
                    self._js.stream_info(f"KV_{self.bucket}"), self._timeout
                )
            except NotFoundError:
                # Deleted, as the refusal advised: make it again, right this time.
                self._kv = None
                self._refusal = None
                await self._bucket(create=True)
                return
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                raise DeadlineStoreError(f"cannot open {self.bucket!r}: {error!r}") from error
            self._refusal = self._refusal_for(info.config)
        if self._refusal is not None:
            raise self._refusal

    def _forget_if_gone(self, error: BaseException) -> None:
        # The bucket's stream was deleted under us: open it again next time (and say so).
        if isinstance(error, (NotFoundError, NoRespondersError, ServiceUnavailableError)):
            if self._kv is not None:
                self._vanished = True
            self._kv = None

    async def _bucket(self, *, create: bool) -> KeyValue:
        if self._kv is not None:
            return self._kv
        self._fail_fast()
        async with self._opening:
            # Those who waited here while it failed fail at once, not one timeout each.
            self._fail_fast()
            if self._kv is None:
                try:
                    self._kv = await self._open(create=create)
                except DeadlinesLostError:
                    raise
                except DeadlineStoreError as error:
                    if isinstance(error.__cause__, asyncio.TimeoutError):
                        self._break(error)  # see _failed
                    raise
            return self._kv

    def _fail_fast(self) -> None:
        """Raise the last error while the store counts as unreachable."""
        if self._broken is not None and time.monotonic() < self._broken_until:
            raise DeadlineStoreError(
                f"{self.bucket!r} did not answer a moment ago, and is not asked again for "
                f"{self._broken_until - time.monotonic():.1f}s (then: {self._broken})"
            )

    def _break(self, error: DeadlineStoreError) -> None:
        self._broken = error
        self._broken_until = time.monotonic() + self._retry_after

    def _failed(self, what: str, error: BaseException) -> DeadlineStoreError:
        """The error for a failed read or write; one that says the server could not be
        reached opens the breaker."""
        failure = DeadlineStoreError(f"{what}: {error!r}")
        # Only a timeout opens it: that is what would make every message wait. Errors that
        # come back at once (a bucket still being created on a cluster, no responders for a
        # moment) cost nothing to try again.
        if isinstance(error, asyncio.TimeoutError):
            self._break(failure)
        return failure

    def _default_replicas(self) -> list[int]:
        # A server that is not part of a cluster cannot have 3 replicas: don't ask.
        info = getattr(getattr(self._js, "_nc", None), "_server_info", None) or {}
        return [3, 1] if info.get("cluster") else [1]

    async def _open(self, *, create: bool) -> KeyValue:
        stream = f"KV_{self.bucket}"
        try:
            info = await asyncio.wait_for(self._js.stream_info(stream), self._timeout)
        except NotFoundError:
            info = None
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            raise DeadlineStoreError(f"cannot open {self.bucket!r}: {error!r}") from error
        if info is not None:
            self._refusal = self._refusal_for(info.config)
            self._recheck_at = time.monotonic() + _RECHECK
            kv = await self._key_value()
        elif not create:
            # Reading never creates the bucket: without it there is no record to find, and an
            # application that never deferred anything gets no bucket it did not ask for.
            raise self._lost("does not exist")
        else:
            kv = await self._create()
            self._refusal = None
            try:
                info = await asyncio.wait_for(self._js.stream_info(stream), self._timeout)
            except (NatsError, asyncio.TimeoutError, OSError):
                info = None  # made, but its creation time unknown for now
        created_at = info.created if info is not None else None
        created = created_at.timestamp() if created_at is not None else None
        if self._vanished and (created is None or created != self._created):
            # Gone while in use, and now another bucket (not the same one, back after an
            # outage): what was recorded in the first is lost.
            log.error(
                "the deadline bucket %r was deleted while in use and is open again: the "
                "deadlines recorded in it are lost, and held messages may run early",
                self.bucket,
            )
        self._vanished = False
        self._created = created
        return kv

    def _lost(self, how: str) -> DeadlinesLostError:
        seen = self._vanished or self._created is not None
        return DeadlinesLostError(
            f"the deadline bucket {self.bucket!r} {how}"
            + (": the deadlines recorded in it are lost" if seen else
               ": if natsmw deferred messages on this server, their deadlines are lost"),
            certain=seen,
        )  # fmt: skip

    def _refusal_for(self, config: StreamConfig) -> DeadlineStoreError | None:
        if config.allow_msg_ttl:
            return None
        error = DeadlineStoreError(
            f"the deadline bucket {self.bucket!r} exists without per-message TTL (its stream "
            f"KV_{self.bucket} has allow_msg_ttl off, as `nats kv add` makes it without "
            f"--marker-ttl): natsmw's records expire on their own and cannot be stored there. "
            f"Delete the bucket (natsmw makes it again), or recreate it with limit markers, "
            f"or pass another bucket name to KeyValueDeadlineStore"
        )
        if self._refusal is None:
            log.error("%s", error)  # once, until it is fixed
        return error

    async def _key_value(self) -> KeyValue:
        try:
            return await asyncio.wait_for(self._js.key_value(self.bucket), self._timeout)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            raise DeadlineStoreError(f"cannot open {self.bucket!r}: {error!r}") from error

    async def _create(self) -> KeyValue:
        replicas = [self._replicas] if self._replicas else self._default_replicas()
        last: BaseException | None = None
        for count in replicas:
            if last is not None:
                log.warning(
                    "could not create bucket %r with %d replicas (%r); creating it with %d: "
                    "its deadlines will not survive the loss of its server",
                    self.bucket, replicas[0], last, count,
                )  # fmt: skip
            try:
                return await asyncio.wait_for(
                    self._js.create_key_value(
                        KeyValueConfig(bucket=self.bucket, replicas=count, direct=True)
                    ),
                    self._timeout,
                )
            except (NatsError, asyncio.TimeoutError, OSError) as error:
                last = error
        raise DeadlineStoreError(f"cannot create bucket {self.bucket!r}: {last!r}") from last
