"""``with_delay_cap``: long ``nak(delay)`` calls never reach the server as asked.

A handler asks for ``nak(delay=3 * 3600)``. The server would keep the message in the
consumer's ack-pending set for three hours. Under ``@with_delay_cap(60)``:

* **park** (nats-server 2.12+, a durable consumer whose due messages this process serves): the
  message waits in the server's own scheduler ([`natsmw.delay.park`][natsmw.delay.park]) and the
  original is acked: nothing sits in ack-pending, no delivery is spent until the deadline;
* **hold** (otherwise, and for delays up to ``park_after``): natsmw records the deadline and
  naks for at most the cap; every redelivery before the deadline is naked again for
  ``min(cap, remaining)`` without calling the handler.

Either way the first delivery after the deadline reaches the handler. This module gathers
what is known of a delivery, asks [`natsmw.delay.decision`][natsmw.delay.decision] what to do, and
does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from natsmw._throttle import Throttled
from natsmw.chain import _UNBOUND, Decorator, Handler, layer
from natsmw.delay.clock import server_clock
from natsmw.delay.deadline import DEADLINE_HEADER, format_deadline, parse_deadline
from natsmw.delay.decision import (
    SLACK,
    Hold,
    Park,
    Run,
    Send,
    delivery_decision,
    hold_interval,
    nak_decision,
)
from natsmw.delay.limits import ConsumerLimits, Limits
from natsmw.delay.memory import Deliveries, Remembered
from natsmw.delay.park import (
    LATEST_SCHEDULE,
    SERVED,
    UNSERVED,
    WANTED,
    DueMsg,
    Parked,
    ParkStream,
    is_served,
    park_stream,
    serving,
)
from natsmw.delay.stores import (
    RECHECK_HELD,
    DeadlineKey,
    DeadlineStore,
    Deferral,
    KeyValueDeadlineStore,
)
from natsmw.duration import Duration, to_positive_seconds
from natsmw.errors import DeadlinesLostError, DeadlineStoreError, ParkError
from natsmw.headers import lazy_message_class, peek_header
from natsmw.message import (
    _JS_ACK_PREFIX,
    _PROXY_CLASSES,
    CAPPED_BY,
    SPAN_KEY,
    MessageProxy,
    Settle,
    Settlement,
    SettlementKind,
    _Interception,
    capped_by,
    nak_settlement,
    remove_last,
    wire_body,
)

__all__ = ["DelayCap", "DelayCapStats", "handler_calls", "with_delay_cap"]

log = logging.getLogger("natsmw.delay")

_CALLS_KEY = "natsmw.delay.calls"
_CAPPED_BY = CAPPED_BY
# NamedTuple's own __new__ is a Python-level call: one per message that bench.micro counts.
_new_key = partial(tuple.__new__, DeadlineKey)
_NAK_ONLY: frozenset[SettlementKind] = frozenset(("nak",))
_LAZY_MSG = lazy_message_class(Msg)  # nats-py's own message, its headers decoded when read
# The original of a parked message is acked and the server's confirmation awaited: once the
# park returns, the message has left ack-pending (a lost ack would keep it there until
# ack_wait brings it back, to be acked then).
_ACK_PARKED = Settlement("ack_sync", timeout=2.0)
# A due copy that fires this little before its deadline (the scheduler ticks every 250 ms) is
# kept back by waiting, not by a nak: no redelivery, and the handler runs on time.
_EARLY_WAIT = 2.0


@dataclass
class DelayCapStats:
    """What one [`DelayCap`][DelayCap] did, counted since it was created.

    Attributes:
        capped: handler naks longer than the cap that were sent capped.
        holds: deliveries held (naked again) without calling the handler.
        parked: messages parked in the server's scheduler (the original acked).
        unparked: due messages that reached the handler after being parked.
        park_fallbacks: messages that should have been parked but were held instead (the
            server has no schedules, the park stream was refused, or the schedule was not
            stored).
        stretched: naks made longer than the cap so the hold fits the consumer's
            ``max_deliver`` (survival over the cap).
        uncapped: long naks sent as the handler asked, because the deadline could not be
            recorded or the consumer's limits could not be read.
        blind_holds: holds made without knowing the deadline: the store was unreachable.
        forced_runs: handler calls before a known deadline, because ``max_deliver`` left no
            delivery to hold with, or could not be read (the alternative could lose the
            message).
        malformed_headers: ``Natsmw-Deadline`` headers that could not be parsed (ignored).
        store_errors: reads or writes of the deadline store that failed.
        lost_deadlines: redeliveries whose deadline record is gone for good (the bucket was
            deleted, or is missing): the handler ran, perhaps early, and an error was logged.
    """

    capped: int = 0
    holds: int = 0
    parked: int = 0
    unparked: int = 0
    park_fallbacks: int = 0
    stretched: int = 0
    uncapped: int = 0
    blind_holds: int = 0
    forced_runs: int = 0
    malformed_headers: int = 0
    store_errors: int = 0
    lost_deadlines: int = 0


@dataclass(frozen=True, slots=True)
class _Found:
    """What is known of a delivery's deadline."""

    deferral: Deferral | None
    recorded: bool  # whether the deferral is (or is to be) kept in the store
    known: bool = True  # False: the store could not be asked, and nothing is known locally
    parked: bool = False  # a schedule of this message waits in the park stream
    entry: Remembered | None = None  # what this instance remembered of it, if anything
    now: float | None = None  # the server's time it was found at, if read on the way


@dataclass(slots=True)
class _Changes:
    """A consumer's change marker as last read: its ``token``, when it was read and when it
    was last seen to move (monotonic)."""

    token: str | None  # None: not read yet
    read_at: float
    changed_at: float
    reading: asyncio.Future[None] | None = None  # a read of the marker under way


_WARN_EVERY = 10.0  # seconds between two warnings of a kind an outage repeats per message
_GENERATIONS_KEPT = 256  # consumers per client; past it, those unused for a minute go
_GENERATION_IDLE = 60.0


def _forget_idle(known: dict[tuple[str, str], _Generation]) -> None:
    """Forget the consumers no first delivery came through for a while (ephemeral and
    ordered consumers come and go by the thousand): each costs one read if it comes back."""
    idle = time.monotonic() - _GENERATION_IDLE
    for name in [name for name, generation in known.items() if generation.fresh_until < idle]:
        del known[name]


class _Generation:
    """One consumer generation, as one delay cap saw it: when it was created, the highest
    consumer sequence seen, and the sequences an earlier consumer of its name left records
    for (listed once, when first needed)."""

    __slots__ = (
        "_listing",
        "_no_bucket_until",
        "_parked_listing",
        "_parked_retry",
        "clear_until",
        "created",
        "created_ns",
        "deferred",
        "fresh_until",
        "high",
        "parked",
        "said",
    )

    def __init__(self, created: float | None, high: int) -> None:
        self.created = created
        # In nanoseconds, as a reply subject gives a message's stored time (rounded up: a
        # message stored in the same nanosecond counts as older, and is looked up).
        self.created_ns = None if created is None else math.ceil(created * 1e9)
        self.high = high
        self.fresh_until = 0.0  # monotonic: read again from the server after this
        self.said = False  # warned that records of an earlier consumer apply
        self._listing: asyncio.Future[set[int] | None] | None = None
        self._no_bucket_until = 0.0
        # What listed() found, for the hot path: the sequences with a record under this
        # consumer's name (empty: no bucket), trusted until ``clear_until`` (monotonic).
        self.deferred: set[int] | None = None
        # The sequences an earlier consumer of its name parked (schedules or due copies
        # waiting), listed once; empty where this process serves none of its due copies.
        # ``None``: not listed (yet).
        self.parked: AbstractSet[int] | None = None
        self._parked_listing: asyncio.Future[AbstractSet[int] | None] | None = None
        self._parked_retry = 0.0  # monotonic: a failed listing is tried again after this
        self.clear_until = 0.0

    def went_back(self, cseq: int) -> bool:
        """Whether a first delivery's consumer sequence may mean the consumer was made again.

        Sequences only grow within one consumer; concurrent handlers see them a little out
        of order. Far back (under half the highest), or back at all while the consumer is
        young, is read as a new consumer, and checked with the server.
        """
        return cseq * 2 < self.high or cseq <= self.high <= _YOUNG

    async def listed(self, store: DeadlineStore, key: DeadlineKey) -> set[int] | None:
        """The sequences with a record under this consumer's name; ``None`` when the store
        cannot list (each message is then looked up)."""
        if self._listing is None:
            if time.monotonic() < self._no_bucket_until:
                # No bucket a moment ago: a consumer made over a long stream would otherwise
                # ask the server for every message it was never going to find.
                raise DeadlinesLostError("no deadline bucket")
            self._listing = asyncio.get_running_loop().create_future()
            listing = self._listing
            try:
                try:
                    found = await _list(store, key.stream, key.consumer)
                except DeadlinesLostError:
                    self._no_bucket_until = time.monotonic() + 5.0  # listed once there is one
                    self.deferred, self.clear_until = set(), self._no_bucket_until
                    raise
                except DeadlineStoreError as error:
                    # Not listed (no permission to watch the bucket, a timeout): every message
                    # of this generation stored before it is looked up instead.
                    log.warning("cannot list the deadline records of %s/%s: %s",
                                key.stream, key.consumer, error)  # fmt: skip
                    found = None
            except BaseException as error:
                self._listing = None
                listing.set_exception(error)
                listing.exception()  # retrieved: callers that wait re-raise it
                raise
            listing.set_result(found)
            if found is not None:
                self.deferred, self.clear_until = found, math.inf
            return found
        return await asyncio.shield(self._listing)

    async def parked_listed(self, parks: ParkStream, key: DeadlineKey) -> AbstractSet[int] | None:
        """The sequences parked under this consumer's name, listed once per generation;
        ``None`` when they cannot be listed now (listed again after a few seconds)."""
        listing = self._parked_listing
        if listing is None or (
            listing.done()
            and time.monotonic() >= self._parked_retry
            # failed: said no (None), raised, or cancelled (a closed event loop's)
            and (listing.cancelled() or listing.exception() is not None or listing.result() is None)
        ):
            listing = self._parked_listing = asyncio.ensure_future(self._list_parked(parks, key))
        return await asyncio.shield(listing)

    async def _list_parked(self, parks: ParkStream, key: DeadlineKey) -> AbstractSet[int] | None:
        try:
            self.parked = await parks.sequences(key.stream, key.consumer)
        except ParkError:
            self._parked_retry = time.monotonic() + _PARKED_RETRY
            return None
        return self.parked


async def _list(store: DeadlineStore, stream: str, consumer: str) -> set[int] | None:
    sequences = getattr(store, "sequences", None)
    if sequences is None:
        return None
    found: set[int] = await sequences(stream, consumer)
    return found


_YOUNG = 64
_PARKED_RETRY = 5.0  # seconds before a failed listing of parked messages is tried again
_LIMITS_AGE_FLOOR = 0.1  # seconds a reading of a consumer's limits is trusted, at least
MIN_CAP = 0.01  # seconds: the shortest cap with_delay_cap takes; 1 ms still made a nak loop
# How long a consumer's creation time is trusted before it is read again (at most one
# consumer-info request per consumer this often, while first deliveries come in): a consumer
# deleted and made again is noticed within this, or at once when its sequences go back.
_RECHECK_GENERATION = 1.0

_NOTHING = _Found(None, recorded=False)
_UNKNOWN = _Found(None, recorded=False, known=False)
_PARKED = _Found(None, recorded=False, parked=True)
_NONE_PARKED: frozenset[int] = frozenset()
# Parked under an earlier consumer of the same name: acked as _PARKED is, said once per
# consumer generation rather than once per message (_said_earlier).
_PARKED_EARLIER = _Found(None, recorded=False, parked=True)


def _said_earlier(generation: _Generation, key: DeadlineKey) -> None:
    """Say once per consumer generation that deferrals of an earlier one apply."""
    if not generation.said:
        generation.said = True
        log.warning(
            "%s was deferred under an earlier consumer of the same name (deleted and made "
            "again): its deadline still stands, as do those of the others",
            key,
        )  # fmt: skip


def with_delay_cap(
    cap: Duration,
    *,
    park_after: Duration | None = None,
    parking: bool = True,
    store: DeadlineStore | None = None,
    jitter: float = 0.1,
) -> DelayCap:
    """Never send a ``nak(delay)`` longer than ``cap``; run the handler at the real deadline.

    Example:
        ```python
        @with_delay_cap(timedelta(minutes=1))
        async def handle(msg):
            await msg.nak(delay=3 * 3600)   # parked until then, or held with 1-minute naks
        ```

    Args:
        cap: the longest nak delay sent to the server (seconds or ``timedelta``).
        park_after: delays longer than this are parked in the server's scheduler (when the
            message can be: see the guide to the park tier); shorter ones are held. By
            default the cap itself.
        parking: ``False`` never parks: every long delay is held.
        store: where deadlines of held messages are kept; by default a JetStream key-value
            bucket ``natsmw_deadlines`` on the message's own connection.
        jitter: capped intervals are shortened by up to this fraction, at random, so that many
            messages deferred together do not come back together. The deadline never moves.

    Raises:
        TypeError: ``cap`` or ``park_after`` is not a number of seconds or a ``timedelta``.
        ValueError: ``cap`` is under 10 ms (a shorter nak only makes the server redeliver
            in a loop), NaN or infinite; ``park_after`` is shorter than ``cap``; or
            ``jitter`` is not in [0, 1).
    """
    return DelayCap(cap, park_after=park_after, parking=parking, store=store, jitter=jitter)


class DelayCap(Decorator):
    """The delay-cap middleware; build it with [`with_delay_cap`][with_delay_cap].

    Apply it to a handler (``@with_delay_cap(60)``) or put it in [`compose`][natsmw.compose].
    ``stats`` counts what it did, across every handler it wraps.
    """

    def __init__(
        self,
        cap: Duration,
        *,
        park_after: Duration | None = None,
        parking: bool = True,
        store: DeadlineStore | None = None,
        jitter: float = 0.1,
    ) -> None:
        self.cap = to_positive_seconds(cap, "cap")
        if self.cap < MIN_CAP:
            raise ValueError(
                f"cap must be at least {MIN_CAP}s, got {cap!r}: a shorter nak only makes the "
                f"server redeliver in a loop"
            )
        if store is not None and (
            isinstance(store, type)  # the class, not a store: MemoryDeadlineStore()
            or not all(
                inspect.iscoroutinefunction(getattr(store, name, None)) for name in ("get", "put")
            )
        ):
            raise TypeError(
                f"store must be a DeadlineStore (async get(key) and put(key, deferral)), for "
                f"example MemoryDeadlineStore() or KeyValueDeadlineStore(js); got {store!r}"
            )
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        threshold = (
            self.cap if park_after is None else to_positive_seconds(park_after, "park_after")
        )
        if threshold < self.cap:
            raise ValueError(
                f"park_after must be at least the cap ({self.cap!r}s), got {park_after!r}: "
                f"delays up to the cap go to the server as they are"
            )
        self.park_after: float | None = threshold if parking else None
        self.jitter = float(jitter)
        self.stats = DelayCapStats()
        self._store = store
        # By id(client): a store holds its client, so a weak key would never go. Stores of
        # closed clients are dropped when another client comes (a service that reconnects).
        self._stores: dict[int, dict[str | None, KeyValueDeadlineStore]] = {}
        # A held message comes back within a cap: unused for two caps, it is not coming.
        self._memory = Deliveries(idle=max(60.0, 2 * self.cap))
        self._recheck_held = RECHECK_HELD
        # Per store and consumer: operators' changes to held records, as last read.
        self._changes: weakref.WeakKeyDictionary[object, dict[tuple[str, str], _Changes]] = (
            weakref.WeakKeyDictionary()
        )
        self._limits = ConsumerLimits()
        # max_deliver can be lowered while messages are held. Read at most half a hold ago,
        # a consumer's limits are read again between any two holds of one message, so a
        # change costs at most one hold planned on the old value, never the last delivery.
        # Not more often than ten times a second per consumer, whatever the cap: under a
        # cap of milliseconds that would be a consumer-info request every few holds.
        self._limits_age = max(self.cap * (1 - self.jitter) / 2, _LIMITS_AGE_FLOOR)
        self._unserved_warned: set[tuple[str, str]] = set()
        self._lost_said_until = 0.0
        self._warnings = Throttled(log, _WARN_EVERY)
        self._no_bucket_warned = False
        # By id(client), then (stream, consumer); read on every first delivery.
        self._generations: dict[int, dict[tuple[str, str], _Generation]] = {}
        self._writing: set[asyncio.Task[None]] = set()  # releases being recorded

    one_per_chain = "delay cap"  # compose() refuses a second one

    def _wrap(self, handler: Handler) -> Handler:
        inner = capped_by(handler)
        if inner is not None:
            raise ValueError(
                f"{self!r} would wrap a handler that {inner!r} already caps: two delay caps "
                f"in one chain keep each message's deadline under the same record and "
                f"overwrite each other. Keep one delay cap per chain (under install(chain=...), "
                f"the chain's or the handler's own)"
            )
        wrapped = layer(self._step, fuse=self._fuse)(handler)
        # functools.wraps copies this onto every wrapper made around it later, so a cap
        # further out sees it through other middlewares.
        setattr(wrapped, _CAPPED_BY, self)
        return wrapped

    def __repr__(self) -> str:
        return (
            f"with_delay_cap({self.cap!r}, park_after={self.park_after!r}, jitter={self.jitter!r})"
        )

    # -- one delivery: gather, decide, act ----------------------------------------------------

    def _step(self, msg: MessageProxy, call_next: Handler) -> Awaitable[None]:
        # Not a coroutine itself: a delivery with nothing to look up goes straight to _run's
        # coroutine, without a frame of its own.
        real = msg.__wrapped__
        if self._usual(real, (), holds=False):
            return self._run(msg, None, 1, None, call_next)
        reply = real.reply
        if not reply or not reply.startswith(_JS_ACK_PREFIX):
            return self._core(msg, call_next)
        if real.__class__ is DueMsg:
            return self._due(msg, real, call_next)
        tokens = reply.split(".")  # $JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ns>.<pending>
        plain = len(tokens) == 9
        if plain:
            stream, consumer, sequence, delivery = (
                tokens[2], tokens[3], int(tokens[5]), int(tokens[4])
            )  # fmt: skip
        else:  # with a domain and an account hash
            stream, consumer, sequence, delivery = msg.position
        key = _new_key((stream, consumer, sequence))
        value = peek_header(real, DEADLINE_HEADER)
        if delivery > 1:
            self._saw(real, key, int(tokens[6]) if plain else None)
            if value is None:
                held = self._hold_now(real, key, delivery)
                if held is not None:
                    return self._nak_for(msg, held[0], delivery, held[1])
        header = None if value is None else self._header_deferral(msg, value)
        return self._looked_up(msg, key, delivery, header, call_next)

    def _fuse(
        self,
        call_next: Handler,
        checks: tuple[Callable[[Msg], bool], ...],
        general: Callable[..., Awaitable[None]],
    ) -> Handler:
        """The chain's handler. Its usual messages (``_usual``) are run or held in this one
        coroutine, with none of ``_step``'s and ``_run``'s frames, and no proxy for a hold;
        every other message (and a method's call) goes to ``general``, the chain's own
        handler, as it would without this."""
        usual, on_settle, end = self._usual, DelayCap._on_settle, self._end_run

        async def handle(msg: Msg, bound_msg: Msg = _UNBOUND) -> None:
            decided = usual(msg, checks) if bound_msg is _UNBOUND else False
            if decided is False:
                await general(msg, bound_msg)
                return
            if decided is not True:
                await decided  # the nak of a usual hold
                return
            kind = msg.__class__
            made = MessageProxy if kind is Msg else _PROXY_CLASSES.get(kind)  # lazy headers'
            proxy = MessageProxy.of(msg) if made is None else made(msg)
            interception = (partial(on_settle, self, proxy, None, 1, 1, 1), _NAK_ONLY)
            proxy._self_interceptors = [interception]  # a new proxy: no other, no span to open
            try:
                await call_next(proxy)
            finally:
                end(proxy, None, 1, None, interception)

        return handle

    def _usual(
        self, real: Msg, checks: tuple[Callable[[Msg], bool], ...], *, holds: bool = True
    ) -> bool | Awaitable[None]:
        """What ``real``, as nats-py delivered it, needs, if it is one of the usual messages of
        nats-py's own class (eager or lazy headers) with a plain reply subject, passed by every
        one of ``checks`` (the layers outside), with no deadline header:

        * ``True``: a first delivery to run with nothing looked up (nothing remembered of it,
          stored under this very consumer: ``_first_of_own``);
        * with ``holds``, the nak of the usual hold, decided and counted (``_hold_now``);
        * ``False``: anything else, and nothing was changed: the long way decides.

        Holds are decided here only where nobody could watch them (a layer that would, such as
        tracing, has no ``passes`` and lets no fused handler run)."""
        kind = real.__class__
        if kind is not Msg and kind is not _LAZY_MSG:
            return False  # due copies have their own way (_due); other classes, the long one
        reply = real.reply
        if not reply or not reply.startswith(_JS_ACK_PREFIX):
            return False
        tokens = reply.split(".")  # $JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ns>.<pending>
        if len(tokens) != 9:
            return False  # with a domain and an account hash
        first = tokens[4] == "1"
        memory = self._memory
        if not first and not (holds and memory._count):
            return False  # a redelivery of nothing deferred here
        for check in checks:  # before any header is read: a guard keeps oversized ones out
            if not check(real):
                return False
        if kind is Msg:  # its headers are a dict: no call to peek
            headers = real.headers
            if headers and DEADLINE_HEADER in headers:
                return False
        elif peek_header(real, DEADLINE_HEADER) is not None:
            return False
        if first:
            if memory._count and not memory.unknown(real._client, tokens[2], tokens[3], tokens[5]):
                return False
            return self._first_of_own(real, tokens)
        key = _new_key((tokens[2], tokens[3], int(tokens[5])))
        delivery = int(tokens[4])
        self._saw(real, key, int(tokens[6]))
        held = self._hold_now(real, key, delivery)
        if held is None:
            return False
        self.stats.holds += 1
        return real.nak(delay=held[0])

    def _hold_now(self, real: Msg, key: DeadlineKey, delivery: int) -> tuple[float, float] | None:
        """The usual hold, on the instance that deferred the message, without the long way's
        frames: its deadline remembered and ahead, checked for an operator's change lately,
        not to be parked, the consumer's limits fresh, and no hold stretched. Recorded as
        held; the nak and the time left are returned for the caller to send. ``None``
        otherwise: the long way (``_looked_up``) decides, as it would have."""
        client = real._client
        entry = self._memory.recall(key, client, delivery)
        if entry is None:
            return None
        deferral = entry.deferral
        if (
            deferral is None
            or deferral.cancelled
            or time.monotonic() - entry.checked >= self._recheck_held
        ):
            return None
        remaining = deferral.deadline - server_clock.now(client)
        if remaining <= 0:
            return None
        park_after = self.park_after
        if (
            park_after is not None
            and remaining > park_after
            # Not parked only where nothing serves the consumer's due messages, as said once
            # on the long way (_park_threshold).
            and (
                serving(client, key.stream, key.consumer) != UNSERVED
                or (key.stream, key.consumer) not in self._unserved_warned
            )
        ):
            return None
        limits = self._limits.cached(client, key.stream, key.consumer, self._limits_age)
        if limits is None:
            return None
        hold = hold_interval(remaining, self.cap, self.jitter, random.random(), delivery, limits)
        if hold is None or hold[1]:  # the handler runs, or a stretched hold, said loudly
            return None
        self._memory.held(entry, key, client, deferral, delivery)
        return hold[0], remaining

    async def _looked_up(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        delivery: int,
        header: Deferral | None,
        call_next: Handler,
    ) -> None:
        """A delivery whose deadline may be ahead: held or parked if it is, run if not."""
        found = await self._gather(msg, key, delivery, header)
        if found is not _NOTHING and await self._kept_back(msg, key, found, delivery):
            return
        await self._run(msg, key, delivery, found.deferral, call_next)

    async def _core(self, msg: MessageProxy, call_next: Handler) -> None:
        """A core NATS message: nothing to defer."""
        opening = msg._self_on_run
        after = opening() if opening is not None else None
        try:
            await call_next(msg)
        finally:
            if after is not None:
                after()

    def _first_of_own(self, real: Msg, tokens: list[str]) -> bool:
        """Whether a first, plain delivery needs no lookup, as far as known without asking:
        it was stored under this very consumer (not one deleted and made again under the
        same name), or an earlier consumer of the name is known to have left it no record.
        ``tokens``: its reply subject's nine, split at the dots (on every first delivery:
        numbers are read from them only as far as needed)."""
        known = self._generations.get(id(real._client))
        generation = None if known is None else known.get((tokens[2], tokens[3]))
        if generation is None:
            return False
        cseq = int(tokens[6])
        high = generation.high
        if not (cseq > high or (cseq * 2 >= high and high > _YOUNG)):  # went_back()
            return False
        now = time.monotonic()
        if now >= generation.fresh_until:
            return False
        created = generation.created_ns
        if created is None or int(tokens[7]) >= created:
            generation.high = cseq
            return True
        # Stored before this consumer: a new durable over a backlog, every message. The
        # earlier consumer's records were listed once; most messages are not among them.
        deferred, parked = generation.deferred, generation.parked
        if deferred is not None and parked is not None and now < generation.clear_until:
            sequence = int(tokens[5])
            if sequence not in deferred and sequence not in parked:
                generation.high = cseq
                return True
        return False

    async def _gather(
        self, msg: MessageProxy, key: DeadlineKey, delivery: int, header: Deferral | None
    ) -> _Found:
        """What is known of this delivery's deadline: from the header, this instance's memory,
        or the store."""
        real = msg.__wrapped__
        entry = self._memory.recall(key, real._client, delivery)
        if header is None and entry is None and delivery == 1:
            # A first, plain delivery: nothing to look up if it was stored under this very
            # consumer (not one deleted and made again under the same name).
            tokens = real.reply.split(".")  # read once, for both
            if len(tokens) != 9:  # with a domain and an account hash: from the metadata
                return await self._first_of_older(msg, key, None)
            if self._first_of_own(real, tokens):
                return _NOTHING
            return await self._first_of_older(msg, key, (int(tokens[6]), int(tokens[7]) / 1e9))
        if header is None and entry is not None and entry.deferral is not None:
            now = server_clock.now(real._client)
            if entry.deferral.deadline > now:
                # The usual hold, on the instance that deferred the message: only a handler
                # run or an operator can move a deadline, no handler ran since this instance
                # last saw it, and operators are read again every RECHECK_HELD seconds.
                if time.monotonic() - entry.checked < self._recheck_held:
                    return _Found(entry.deferral, recorded=True, entry=entry, now=now)
                return await self._recheck(msg, key, entry, now)
        return await self._find(msg, key, delivery, header, entry)

    async def _recheck(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        entry: Remembered,
        now: float,
        *,
        coming_due: bool = False,
    ) -> _Found:
        """Read a held message's record again: an operator may have released or cancelled it
        (``natsmw deferred``). Anything else read keeps what this instance knows."""
        remembered = entry.deferral
        assert remembered is not None
        before = entry.checked
        if coming_due:
            changed, as_of = True, time.monotonic()
        else:
            changed, as_of = await self._changed_since(msg, key, entry.checked)
        # As of when the marker (or the record) was read, not now: a change that came after
        # that read is seen at the next one, within RECHECK_HELD.
        entry.checked = as_of
        if not changed:
            return _Found(remembered, recorded=True, entry=entry, now=now)
        entry.checked = time.monotonic()  # the read below tells of every change before it
        try:
            stored = await self._store_for(msg).get(key)
        except DeadlineStoreError as error:
            # Unreachable now: the deadline known here stands, and the change seen is still
            # to be read, at the next hold (an operator's release must not wait for the
            # deadline).
            entry.checked = before
            self.stats.store_errors += 1
            self._warn("unreachable", "deadline store unreachable for %s: %s", key, error)
            stored = None
        if (
            stored is not None
            and stored.deferred_at == remembered.deferred_at
            # cancelled, released early, or run by another instance since
            and (
                stored.cancelled
                or stored.deadline != remembered.deadline
                or stored.released_at is not None
            )
        ):
            entry.deferral = stored
            return _Found(stored, recorded=True, entry=entry)
        return _Found(remembered, recorded=True, entry=entry, now=now)

    async def _changed_since(
        self, msg: MessageProxy, key: DeadlineKey, checked: float
    ) -> tuple[bool, float]:
        """Whether an operator may have changed held records of the message's consumer since
        ``checked`` (monotonic), and as of when that is known: one read of the consumer's
        change marker every ``RECHECK_HELD`` seconds answers for all its held messages.
        Always changed for a store of the user's own: each record is read again, as before."""
        store = self._store_for(msg)
        now = time.monotonic()
        if not isinstance(store, KeyValueDeadlineStore):
            return True, now
        consumers = self._changes.get(store)
        if consumers is None:
            consumers = self._changes[store] = {}
        name = (key.stream, key.consumer)
        known = consumers.get(name)
        if known is not None and known.reading is not None:
            await asyncio.shield(known.reading)  # a batch held at once: one read for all
        elif (
            known is None or now - known.read_at >= self._recheck_held
        ) and not await self._read_changes(store, consumers, name, now):
            return True, now  # the record's own read will tell, or keep what is known
        known = consumers.get(name)
        if known is None:  # the read failed (this one's, or the one it waited for)
            return True, now
        return checked < known.changed_at, known.read_at

    async def _read_changes(
        self,
        store: KeyValueDeadlineStore,
        consumers: dict[tuple[str, str], _Changes],
        name: tuple[str, str],
        now: float,
    ) -> bool:
        """Read the consumer's change marker (begun at ``now``), once for all who ask
        meanwhile. Whether it could be read."""
        reading = asyncio.get_running_loop().create_future()
        known = consumers.get(name)
        if known is None:
            # First read here: whether the marker moved since this instance deferred what it
            # remembers is unknown, so all of that counts as changed until the read is done
            # (then each of those records is read once more).
            known = consumers[name] = _Changes(None, now, math.inf)
        known.reading = reading
        token: str | None = None
        try:
            token = await store.changes(*name)
        except DeadlinesLostError as error:
            # No bucket, and none seen by this store: no record, no change to one yet.
            token = None if error.certain else ""
        except DeadlineStoreError:
            pass
        finally:
            reading.set_result(None)
            known.reading = None
            if token is None and known.token is None and consumers.get(name) is known:
                del consumers[name]  # never read (failed, or its task cancelled)
        if token is None:
            return False
        if token != known.token:
            # Moved as of the read's end, not its start: a record remembered while the read
            # was on its way may have been changed before the server read the marker.
            known.token, known.changed_at = token, time.monotonic()
        known.read_at = now
        return True

    async def _know_changes(self, msg: MessageProxy, key: DeadlineKey) -> None:
        """Read the consumer's change marker before this instance first defers one of its
        messages, so that the deferrals it remembers after that are not read again at the
        marker's first look (each, one store read, ``RECHECK_HELD`` after a start)."""
        store = self._store_for(msg)
        if isinstance(store, KeyValueDeadlineStore):
            consumers = self._changes.get(store)
            known = None if consumers is None else consumers.get((key.stream, key.consumer))
            if known is None:
                await self._changed_since(msg, key, 0.0)
            elif known.token is None and known.reading is not None:
                await asyncio.shield(known.reading)  # deferrals at once: after the first read

    async def _first_of_older(
        self, msg: MessageProxy, key: DeadlineKey, numbers: tuple[int, float] | None
    ) -> _Found:
        """A first delivery that the hot path could not clear. If the message was stored
        before its consumer was created, an earlier consumer of the same name (deleted and
        made again) may have deferred it: its record says until when."""
        real = msg.__wrapped__
        if numbers is None:  # a reply subject with a domain: read the metadata
            numbers = (real.metadata.sequence.consumer, real.metadata.timestamp.timestamp())
        cseq, stored_at = numbers
        generation = await self._generation(msg, key, cseq)
        if generation.created is None or stored_at >= generation.created:
            return _NOTHING  # stored under this consumer (or its age is unknown)
        if await self._parked_earlier(msg, key, generation):
            _said_earlier(generation, key)
            return _PARKED_EARLIER
        try:
            deferred = await generation.listed(self._store_for(msg), key)
        except DeadlinesLostError:
            return _NOTHING  # no bucket: nothing was ever recorded here
        if deferred is not None and key.sequence not in deferred:
            return _NOTHING
        try:
            stored = await self._store_for(msg).get(key)
        except DeadlinesLostError:
            return _NOTHING
        except DeadlineStoreError as error:
            return self._unreachable(key, error)
        if (
            stored is None
            # compared as the record was written: from the metadata (microseconds)
            or stored.stored_at not in (None, real.metadata.timestamp.timestamp())
            or stored.consumer_created == generation.created
        ):
            return _NOTHING
        _said_earlier(generation, key)
        return _Found(stored.in_generation(generation.created), recorded=True)

    def _saw(self, real: Msg, key: DeadlineKey, cseq: int | None) -> None:
        """Note a redelivery's consumer sequence (``None``: read it from the reply subject):
        a consumer made again starts from 1."""
        known = self._generations.get(id(real._client))
        generation = None if known is None else known.get((key.stream, key.consumer))
        if generation is None:
            return
        if cseq is None:
            numbers = _reply_numbers(real)
            if numbers is None:
                return
            cseq = numbers[0]
        if cseq > generation.high:
            generation.high = cseq

    async def _generation(self, msg: MessageProxy, key: DeadlineKey, cseq: int) -> _Generation:
        """The consumer generation a first delivery belongs to, read again from the server
        at first sight, and when the consumer sequence went back (the consumer was made
        again: its sequences start at 1)."""
        client = msg.__wrapped__._client
        known = self._generations.get(id(client))
        if known is None:
            known = self._generations[id(client)] = {}
            weakref.finalize(client, self._generations.pop, id(client), None)
            self._drop_closed_stores()  # a new client: a service that reconnects
            await self._watch_creations(client, known)
        generation = known.get((key.stream, key.consumer))
        if (
            generation is not None
            and not generation.went_back(cseq)
            and time.monotonic() < generation.fresh_until
        ):
            generation.high = cseq
            return generation
        if generation is not None:
            generation.fresh_until = 0.0  # deliveries meanwhile wait for this read too
        limits = await self._limits.read(
            client, key.stream, key.consumer, msg.metadata.domain or None, max_age=0.0
        )
        current = known.get((key.stream, key.consumer))
        if current is None or current.created != limits.created:
            if current is None and len(known) >= _GENERATIONS_KEPT:
                _forget_idle(known)
            current = known[(key.stream, key.consumer)] = _Generation(limits.created, cseq)
        else:
            current.high = cseq  # the same consumer: count on from here
        current.fresh_until = time.monotonic() + _RECHECK_GENERATION
        return current

    async def _watch_creations(
        self, client: Client, known: dict[tuple[str, str], _Generation]
    ) -> None:
        """Hear from the server when a consumer is created again: its creation time is then
        read again before the next first delivery is trusted. One subscription per client,
        for every consumer. Where the account may not subscribe to advisories, the
        once-a-second read is all there is."""

        async def created(advisory: Msg) -> None:
            _, stream, consumer = advisory.subject.rsplit(".", 2)
            generation = known.get((stream, consumer))
            if generation is not None:
                generation.fresh_until = 0.0

        if not isinstance(client, Client):
            return  # a stand-in client (bench.micro): nothing to hear from
        # Client.subscribe itself, not an install()'s wrapper: natsmw's own traffic never
        # goes through a user's chain.
        with contextlib.suppress(NatsError, ValueError):
            await Client.subscribe(client, "$JS.EVENT.ADVISORY.CONSUMER.CREATED.*.*", cb=created)

    async def _run(
        self,
        msg: MessageProxy,
        key: DeadlineKey | None,
        delivery: int,
        deferral: Deferral | None,
        call_next: Handler,
        *,
        calls_before: int = 0,
        shown: int | None = None,
    ) -> None:
        """Call the handler, with its long naks capped or parked.

        ``calls_before``: handler calls made before the deliveries counted by ``delivery``
        (while parked); ``shown``: the ``num_delivered`` the handler sees (``None``:
        ``delivery``). ``key`` is ``None`` for a first delivery on the hot path: read from
        the message if it is needed.
        """
        if deferral is None:
            own = delivery
        else:
            key = key or _key_of(msg)
            own = await self._release(msg, key, deferral, delivery)
        calls = calls_before + own
        if calls != (delivery if shown is None else shown):
            # handler_calls() falls back to num_delivered, which is shown
            msg.state[_CALLS_KEY] = calls
        # One flat partial of the function (no bound method, no closure: cheaper to make; a
        # partial kept on the cap would make the cap refer to itself).
        interception = (
            partial(DelayCap._on_settle, self, msg, key, delivery, own, calls),
            _NAK_ONLY,
        )
        interceptors = msg._self_interceptors  # what msg.intercept() does, without its calls
        if interceptors is None:
            msg._self_interceptors = [interception]
        else:
            interceptors.append(interception)
        opening = msg._self_on_run
        after = opening() if opening is not None else None  # an outer tracing's span opens
        try:
            await call_next(msg)
        finally:
            if after is not None:
                after()
            self._end_run(msg, key, delivery, deferral, interception)

    async def _on_settle(
        self,
        msg: MessageProxy,
        key: DeadlineKey | None,
        delivery: int,
        own: int,
        calls: int,
        settlement: Settlement,
        send: Settle,
    ) -> Any:
        """The cap's interceptor of the handler's naks (``partial``-bound per message: it costs
        less to make than a closure): a long one is deferred."""
        if settlement.delay is None or settlement.delay <= self.cap:
            return await send(settlement)
        return await self._defer(
            msg, key or _key_of(msg), delivery, delivery - own, calls, settlement.delay, send
        )

    def _end_run(
        self,
        msg: MessageProxy,
        key: DeadlineKey | None,
        delivery: int,
        deferral: Deferral | None,
        interception: _Interception,
    ) -> None:
        """Once the handler is done: its interceptor gone, and what it did noted."""
        interceptors = msg._self_interceptors
        if interceptors and interceptors[-1] is interception:
            del interceptors[-1]
        elif interceptors:
            remove_last(interceptors, interception)
        settlement = msg._self_settlement
        if (
            deferral is not None  # (unsettled without one: nothing to note, _after_call)
            if settlement is None
            else settlement.kind == "nak"
            or (self._memory._count and (key is not None or self._remembers(msg)))
        ):
            self._after_call(msg, key or _key_of(msg), delivery, deferral)

    def _remembers(self, msg: MessageProxy) -> bool:
        """Whether anything is remembered of a first delivery that took the hot path (a
        plain reply subject), which knew nothing of it: a long nak (``_defer``) since."""
        tokens = (msg.__wrapped__.reply or "").split(".")
        if len(tokens) != 9:  # rewritten since: ask as before
            return True
        return not self._memory.unknown(msg.__wrapped__._client, tokens[2], tokens[3], tokens[5])

    async def _kept_back(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        found: _Found,
        delivery: int,
        *,
        may_park: bool = True,
    ) -> bool:
        """Hold or park the delivery if its deadline is ahead (or unknown); say whether it was."""
        if found.parked:
            # Parked before, and the ack of the original was lost (or its consumer was made
            # again): the copy in the park stream carries its future. Settle the original
            # without calling the handler.
            if found is not _PARKED_EARLIER:
                log.warning(
                    "%s seq %s came back, but it is parked already (the ack after parking was "
                    "lost): acking it without calling the handler; the parked copy runs at the "
                    "deadline",
                    msg.subject, key.sequence,
                )  # fmt: skip
            self._memory.gone(key, msg.__wrapped__._client)
            await msg.ack()
            return True
        deferral = found.deferral
        if found.known:
            if deferral is None:
                return False
            if deferral.cancelled:
                await self._cancelled(msg, key)
                return True
            now = found.now  # read just before, with no await since: the hold's hot path
            if now is None:
                now = server_clock.now(msg.__wrapped__._client)
            remaining: float | None = deferral.deadline - now
            if remaining is not None and remaining <= 0:
                return False
        else:
            remaining = None
        limits = self._limits.cached(
            msg.__wrapped__._client, key.stream, key.consumer, self._limits_age
        )
        if limits is None:
            limits = await self._limits_of(msg, key)
        parkable = (
            may_park
            and remaining is not None
            and self.park_after is not None
            and remaining > self.park_after
            and deferral is not None
            and deferral.deadline < LATEST_SCHEDULE
        )
        park_after = None
        if parkable:
            real = msg.__wrapped__
            origin = real.parked if real.__class__ is DueMsg else key
            state = serving(real._client, origin.stream, origin.consumer)
            if state == WANTED:
                await self._prepare_parking(msg, origin)
            park_after = self._park_threshold(msg, origin, limits, state)
        decision = delivery_decision(
            remaining,
            cap=self.cap,
            park_after=park_after,
            jitter=self.jitter,
            draw=random.random(),
            delivery=delivery,
            limits=limits,
        )
        # type(), not isinstance: the decisions are final classes, and this runs per hold
        if type(decision) is Park and deferral is not None:
            calls_before = deferral.calls_before + delivery - 1 - deferral.skipped(delivery)
            real = msg.__wrapped__
            if real.__class__ is DueMsg:
                calls_before += real.parked.calls  # a due copy that came far too early

            async def ack(settlement: Settlement) -> None:
                await msg.ack_sync(settlement.timeout)  # through the middlewares around this one

            if await self._park(msg, key, deferral.deadline, calls_before, deferral.requested,
                                deferral.traceparent, ack):  # fmt: skip
                return True
            decision = delivery_decision(
                remaining, cap=self.cap, park_after=None, jitter=self.jitter,
                draw=random.random(), delivery=delivery, limits=limits,
            )  # fmt: skip
        if type(decision) is Run:
            if decision.forced:
                self._forced_run(msg, delivery, decision.remaining)
            return False
        assert type(decision) is Hold
        if deferral is None:
            await self._hold_blind(msg, decision, delivery)
            return True
        await self._hold(msg, decision, delivery, remaining or 0.0, limits)
        if found.recorded:
            self._memory.held(found.entry, key, msg.__wrapped__._client, deferral, delivery)
        return True

    # -- finding the deadline ---------------------------------------------------------------

    async def _find(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        delivery: int,
        header: Deferral | None,
        entry: Remembered | None,
    ) -> _Found:
        client = msg.__wrapped__._client
        if header is not None and server_clock.stale(client):
            # A publisher's deadline is compared with the server's time: measure it first.
            await self._measure_clock(msg, parking=False)
        now = server_clock.now(client)
        if header is not None and header.deadline > now:
            return _Found(header, recorded=False)
        if entry is not None and entry.deferral is not None and entry.deferral.deadline > now:
            # Only a handler run can move a deadline, and no handler runs before this one.
            return _Found(entry.deferral, recorded=True, entry=entry)
        if entry is not None and entry.last_delivery == delivery - 1:
            # This instance saw every delivery since it last looked: nobody else ran the
            # handler, so what it knows is all there is, but for an operator's cancel: a
            # held message coming due reads its record once before it runs.
            deferral = entry.deferral
            if (
                deferral is not None
                and deferral.released_at is None
                and not math.isinf(entry.checked)
            ):
                # The record itself, not the change marker as last read: a cancel seconds
                # ago must stop the run.
                return await self._recheck(msg, key, entry, now, coming_due=True)
            return _Found(entry.deferral or header, recorded=entry.deferral is not None)
        if entry is None and delivery == 1:
            return _Found(header, recorded=False)  # records are written when a handler naks
        store = self._store_for(msg)
        stored_at = msg.metadata.timestamp.timestamp()
        # A message with a deadline of its own (a publisher's, or a parked one) needs no
        # record: a missing one is no sign of loss there.
        own_deadline = header is not None or msg.__wrapped__.__class__ is DueMsg
        try:
            stored = await store.get(key)
        except DeadlinesLostError as error:
            if own_deadline:
                pass
            elif error.certain:
                self._deadline_lost(key, delivery, str(error))
            elif not self._no_bucket_warned:
                self._no_bucket_warned = True
                log.warning("%s came back (delivery %d): %s", key, delivery, error)
            stored = None
        except DeadlineStoreError as error:
            return self._unreachable(key, error)
        else:
            created = getattr(store, "created_at", None)
            if stored is None and not own_deadline and created is not None and created > stored_at:
                self._deadline_lost(
                    key, delivery, "the deadline bucket was created after the message was "
                    "stored (deleted and made again?): a deadline recorded before is lost",
                )  # fmt: skip
        if stored is not None and stored.consumer_created is not None:
            limits = await self._limits_of(msg, key)
            stored = stored.in_generation(limits.created)
        if stored is not None and not stored.fits(delivery, stored_at):
            log.warning(
                "ignoring a deadline record for %s left by an earlier stream or consumer", key
            )
            stored = None
        if stored is not None:
            return _Found(stored, recorded=True)
        if await self._parked_already(msg, key):
            return _PARKED
        return _Found(header, recorded=False)

    async def _measure_clock(self, msg: MessageProxy, *, parking: bool) -> None:
        """Measure this host's clock against the server's before a deadline is written, where
        natsmw writes anyway: its park stream, else the default deadline bucket."""
        client = msg.__wrapped__._client
        if not server_clock.stale(client):
            return
        parks = park_stream(client)
        if parking and parks.ready:
            await parks.measure_clock()
        elif isinstance(store := self._store_for(msg), KeyValueDeadlineStore):
            await store.measure_clock(create=True)
        elif parks.ready:
            await parks.measure_clock()
        else:
            server_clock.unmeasurable(client, "the deadline store is not natsmw's bucket")

    def _unreachable(self, key: DeadlineKey, error: DeadlineStoreError) -> _Found:
        """The store could not be asked: nothing is known (the delivery is held blind)."""
        self.stats.store_errors += 1
        self._warn("unreachable", "deadline store unreachable for %s: %s", key, error)
        return _UNKNOWN

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """Log a warning of this kind at most once every few seconds: an outage touches every
        message, and one line each would drown the log (``stats`` count them all)."""
        self._warnings.warning(kind, message, *args)

    def _deadline_lost(self, key: DeadlineKey, delivery: int, why: str) -> None:
        """The record that may have held this delivery back is gone: say so, loudly."""
        self.stats.lost_deadlines += 1
        now = time.monotonic()
        if now < self._lost_said_until:
            return
        self._lost_said_until = now + 60.0  # once a minute: the count says how many
        log.error(
            "%s came back (delivery %d) and its deadline cannot be known: %s. Calling the "
            "handler, which may be early; see stats.lost_deadlines",
            key, delivery, why,
        )  # fmt: skip

    async def _parked_earlier(
        self, msg: MessageProxy, key: DeadlineKey, generation: _Generation
    ) -> bool:
        """Whether a message stored before its consumer was made waits in the park stream,
        parked under an earlier consumer of the same name (deleted and made again): the
        original was acked there, and its due copy runs it at the deadline. Asked where this
        process serves that consumer's due copies (or wants to), whether or not its cap
        parks: elsewhere a due copy would not run here either, and the park stream may not
        even be readable."""
        client = msg.__wrapped__._client
        if serving(client, key.stream, key.consumer) == UNSERVED:
            generation.parked = _NONE_PARKED
            return False
        parks = park_stream(client)
        parked = await generation.parked_listed(parks, key)
        if parked is None:
            self._warn(
                "parked-listing",
                "cannot list the messages parked under %s/%s: one parked under an earlier "
                "consumer of the name (deleted and made again) may run before its deadline, "
                "and again from its due copy",
                key.stream, key.consumer,
            )  # fmt: skip
            return False
        if key.sequence not in parked:
            return False
        try:
            return await parks.holds(
                key.stream, key.consumer, key.sequence, msg.metadata.timestamp.timestamp()
            )
        except ParkError as error:
            log.warning("cannot tell whether %s is parked (%s): handling it", key, error)
            return False

    async def _parked_already(self, msg: MessageProxy, key: DeadlineKey) -> bool:
        """Whether a redelivered original was parked (its ack lost): a schedule or a due copy
        of it waits in the park stream. Only asked where parking may have happened."""
        client = msg.__wrapped__._client
        if self.park_after is None or not is_served(client, key.stream, key.consumer):
            return False
        stored_at = msg.metadata.timestamp.timestamp()
        try:
            return await park_stream(client).holds(
                key.stream, key.consumer, key.sequence, stored_at
            )
        except ParkError as error:
            log.warning("cannot tell whether %s is parked (%s): handling it", key, error)
            return False

    def _header_deferral(self, msg: MessageProxy, value: str) -> Deferral | None:
        """The deferral a ``Natsmw-Deadline`` header (``value``) asks for, if still ahead."""
        stored_at = msg.metadata.timestamp.timestamp()
        try:
            deadline = parse_deadline(value).timestamp()
        except ValueError as error:
            self.stats.malformed_headers += 1
            self._warn("malformed", "ignoring the deadline of %s seq %s: %s", msg.subject,
                       _seq(msg), error)  # fmt: skip
            return None
        if deadline <= stored_at:
            return None  # due before the message was even stored: nothing to hold
        return Deferral(deadline=deadline, stored_at=stored_at)

    def _store_for(self, msg: MessageProxy) -> DeadlineStore:
        if self._store is not None:
            return self._store
        client = msg.__wrapped__._client
        domain = msg.metadata.domain or None
        stores = self._stores.get(id(client))
        if stores is None:
            self._drop_closed_stores()
            stores = self._stores[id(client)] = {}
        store = stores.get(domain)
        if store is None:
            # In the message's JetStream domain, where its consumer is (as its limits are).
            # Client.jetstream itself, not an install()'s wrapper: natsmw's own traffic never
            # goes through a user's chain.
            js = Client.jetstream(client, domain=domain)
            store = stores[domain] = KeyValueDeadlineStore(js, domain=domain)
        return store

    def _drop_closed_stores(self) -> None:
        """Stores hold their client: those of closed clients go, so that the clients can."""
        for other in [key for key, kept in self._stores.items() if _closed(kept)]:
            del self._stores[other]

    async def _limits_of(self, msg: MessageProxy, key: DeadlineKey) -> Limits:
        client = msg.__wrapped__._client
        cached = self._limits.cached(client, key.stream, key.consumer, self._limits_age)
        if cached is not None:
            return cached
        return await self._limits.read(
            client, key.stream, key.consumer, msg.metadata.domain or None,
            max_age=self._limits_age,
        )  # fmt: skip

    async def _prepare_parking(self, msg: MessageProxy, origin: DeadlineKey | Parked) -> None:
        """Make the park stream when something here wants to serve ``origin``'s consumer
        (``serving()`` says ``WANTED``) but cannot pull yet because the stream does not exist:
        this delivery is held, later ones park."""
        parks = park_stream(msg.__wrapped__._client)
        if parks.refused:
            return
        try:
            await parks.ensure()
        except ParkError as error:
            self.stats.park_fallbacks += 1
            log.warning("long delays on %s/%s are held, not parked: %s",
                        origin.stream, origin.consumer, error)  # fmt: skip

    def _park_threshold(
        self, msg: MessageProxy, origin: DeadlineKey | Parked, limits: Limits, state: int
    ) -> float | None:
        """``park_after`` if this message can be parked, else ``None``. ``origin``: the
        consumer the message was deferred on; ``state``: what ``serving()`` says of it.

        Only messages of a durable consumer whose due messages this process serves: a parked
        message that nobody brings back would be lost.
        """
        if self.park_after is None:
            return None
        real = msg.__wrapped__
        if state != SERVED:
            if state == WANTED:
                return None  # its pull is starting (or failing, and saying so): hold for now
            if (origin.stream, origin.consumer) not in self._unserved_warned:
                self._unserved_warned.add((origin.stream, origin.consumer))
                log.warning(
                    "long delays on %s/%s are held, not parked: nothing in this process "
                    "serves its due messages (use install(nc, chain=...), or serve_parked)",
                    origin.stream, origin.consumer,
                )  # fmt: skip
            return None
        if real.__class__ is not DueMsg and not (limits.durable and limits.ack_explicit):
            # An ephemeral consumer may be gone before the message is due; on an ack-all
            # consumer the ack of a parked original would ack every earlier message too.
            return None
        if real.metadata.domain:
            return None  # natsmw_parked lives in the client's own domain: hold instead
        if park_stream(real._client).refused:
            return None  # refused a moment ago, and said so: hold without asking again
        if _too_big_to_park(real):
            return None  # said once, when the handler asked (_defer)
        return self.park_after

    def _after_call(
        self, msg: MessageProxy, key: DeadlineKey, delivery: int, deferral: Deferral | None
    ) -> None:
        settlement = msg.settlement
        if settlement is not None and settlement.kind != "nak":
            self._memory.gone(key, msg.__wrapped__._client)  # acked, termed or parked
            return
        if settlement is None and deferral is None:
            # Unsettled here: nats-py's auto-ack will settle it, or, rarely, ack_wait will
            # bring it back (a store read then). Remembering every such message would fill
            # the memory of auto-ack consumers for nothing.
            return
        if self._memory.last_delivery(key, msg.__wrapped__._client) == delivery:
            return  # the handler deferred it: _defer remembered the new deadline
        self._memory.seen(key, msg.__wrapped__._client, deferral, delivery)

    # -- due messages (parked, now back) ------------------------------------------------------

    async def _parked_again(
        self, msg: MessageProxy, due: DueMsg, key: DeadlineKey, delivery: int
    ) -> bool:
        """A redelivered due copy whose handler parked the message again (the ack of the
        copy was lost): the new schedule carries its future; ack the copy, call nothing."""
        if self._memory.recall(key, due._client, delivery) is not None:
            return False  # this instance followed it: no park since
        parked = due.parked
        try:
            again = await park_stream(due._client).holds(
                parked.stream, parked.consumer, parked.sequence, parked.stored_at, due=False
            )
        except ParkError as error:
            log.warning("cannot tell whether %s was parked again (%s): handling it", key, error)
            return False
        if again:
            log.warning(
                "%s seq %s: a due copy came back, but the message is parked again (the ack "
                "after parking was lost): acking the copy without calling the handler",
                due.subject, parked.sequence,
            )  # fmt: skip
            await msg.ack()
        return again

    async def _due(self, msg: MessageProxy, due: DueMsg, call_next: Handler) -> None:
        """A parked message is back. Its park deadline is kept like a header's; a deadline the
        handler asked for on an earlier run of the due copy (a hold) is kept as any other."""
        parked = due.parked
        await park_stream(due._client).measure_clock()
        remaining = parked.deadline - server_clock.now(due._client)
        if 0 < remaining <= _EARLY_WAIT:
            await asyncio.sleep(remaining + SLACK)  # fired a tick early: never run early
            remaining = parked.deadline - server_clock.now(due._client)
        position = msg.position  # the due copy's: that is what gets settled
        key = DeadlineKey(position.stream, position.consumer, position.stream_sequence)
        delivery = position.delivered
        if delivery > 1 and await self._parked_again(msg, due, key, delivery):
            return
        # Far too early (this host's clock is ahead of the server's): held like a deadline
        # from a header, never parked again (the server would fire it at once, again).
        header = Deferral(deadline=parked.deadline) if remaining > 0 else None
        if delivery > 1:
            self._saw(due, key, None)
        found = await self._gather(msg, key, delivery, header)
        if header is not None and found.deferral is header:
            # Remembered like a handler's deferral: the holds it takes are not handler calls.
            found = replace(found, recorded=True)
        if found is not _NOTHING and await self._kept_back(
            msg, key, found, delivery, may_park=header is None
        ):
            return
        deferral = found.deferral
        if (deferral is None and delivery == 1) or (
            deferral is not None
            and deferral.deferred_at == 0
            and deferral.deadline == parked.deadline
        ):
            # The first run since the park (later runs of the due copy are its redeliveries).
            self.stats.unparked += 1
            msg.report(
                "natsmw.delay.unparked",
                {"natsmw.delay.deadline": _iso(parked.deadline),
                 "natsmw.delay.late_s": round(
                     max(server_clock.now(due._client) - parked.deadline, 0.0), 3),
                 "natsmw.delay.handler_calls_before": parked.calls,
                 "natsmw.message.delivery_count": due.metadata.num_delivered},
                link=parked.traceparent,
            )  # fmt: skip
        await self._run(msg, key, delivery, deferral, call_next,
                        calls_before=parked.calls, shown=due.metadata.num_delivered)  # fmt: skip

    # -- holding ----------------------------------------------------------------------------

    async def _hold(
        self, msg: MessageProxy, hold: Hold, delivery: int, remaining: float, limits: Limits
    ) -> None:
        if hold.stretched:
            self._stretched(msg, hold, delivery, remaining, limits)
        await self._nak_for(msg, hold.nak, delivery, remaining)

    async def _nak_for(
        self, msg: MessageProxy, nak: float, delivery: int, remaining: float
    ) -> None:
        """Hold the delivery for ``nak`` seconds: count it, tell observers, send the nak."""
        self.stats.holds += 1
        if msg._self_observers:  # one per hold: only built for someone who listens
            msg.report(
                "natsmw.delay.hold",
                {"natsmw.delay.remaining_s": remaining, "natsmw.delay.nak_s": nak,
                 "natsmw.message.delivery_count": delivery},
            )  # fmt: skip
        settlement = nak_settlement(nak)  # a valid delay: no checks
        if msg._self_interceptors:
            await msg._settle(settlement)
        else:  # nobody around intercepts (the usual case): one frame less
            await msg._send(settlement)

    async def _hold_blind(self, msg: MessageProxy, hold: Hold, delivery: int) -> None:
        self.stats.blind_holds += 1
        msg.report(
            "natsmw.delay.blind_hold",
            {"natsmw.delay.nak_s": hold.nak, "natsmw.message.delivery_count": delivery},
        )
        self._warn(
            "blind",
            "holding %s seq %s for %.3fs: the deadline store is unreachable, so whether it "
            "has a deadline is unknown",
            msg.subject, _seq(msg), hold.nak,
        )  # fmt: skip
        await msg.nak(hold.nak)

    def _stretched(
        self, msg: MessageProxy, hold: Hold, delivery: int, remaining: float, limits: Limits
    ) -> None:
        self.stats.stretched += 1
        max_deliver = limits.max_deliver
        _survival(msg, "stretched", delivery, remaining, max_deliver=max_deliver, nak_s=hold.nak)
        # Every hold of such a message is stretched: one line every few seconds, not one per
        # hold of each of 100k messages (stats.stretched and the survival counter count all).
        self._warn(
            "stretched",
            "nak of %s seq %s stretched to %.3fs (cap %.3fs): max_deliver=%s leaves %s "
            "deliveries for %.3fs",
            msg.subject, _seq(msg), hold.nak, self.cap, max_deliver,
            None if max_deliver is None else max_deliver - delivery, remaining,
        )  # fmt: skip

    def _forced_run(self, msg: MessageProxy, delivery: int, remaining: float | None) -> None:
        """Survival over the deadline: no nak is safe, so the handler runs now, loudly."""
        self.stats.forced_runs += 1
        _survival(msg, "forced_run", delivery, remaining)
        before = (
            "without knowing its deadline"
            if remaining is None
            else f"{remaining:.3f}s before its deadline"
        )
        log.error(
            "calling the handler for %s seq %s %s: a nak now could lose the message "
            "(max_deliver leaves no delivery to hold with, or cannot be read)",
            msg.subject, _seq(msg), before,
        )  # fmt: skip

    # -- parking ----------------------------------------------------------------------------

    async def _park(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        deadline: float,
        calls: int,
        requested: float | None,
        traceparent: str | None,
        send: Settle,
    ) -> bool:
        """Park the message until ``deadline``, then settle the delivery with an ack.

        Returns ``False``, loudly, when it could not be parked: the caller holds it instead.
        """
        real = msg.__wrapped__
        origin = real.parked if real.__class__ is DueMsg else None
        metadata = msg.metadata
        parked = Parked(
            stream=key.stream if origin is None else origin.stream,
            consumer=key.consumer if origin is None else origin.consumer,
            sequence=key.sequence if origin is None else origin.sequence,
            subject=real.subject,
            deadline=deadline,
            calls=calls,
            delivered=metadata.num_delivered,
            stored_at=metadata.timestamp.timestamp(),
            requested=requested,
            traceparent=traceparent,
        )
        try:
            await park_stream(real._client).park(parked, wire_body(real), real.headers)
        except ParkError as error:
            self.stats.park_fallbacks += 1
            _survival(msg, "park_fallback", msg.position.delivered,
                      deadline - server_clock.now(real._client),
                      reason=str(error)[:200])  # fmt: skip
            log.warning(
                "could not park %s seq %s (%s): holding it with naks of at most %.3fs instead",
                msg.subject, parked.sequence, error, self.cap,
            )  # fmt: skip
            return False
        self.stats.parked += 1
        self._memory.gone(key, msg.__wrapped__._client)
        msg.report(
            "natsmw.delay.parked",
            {"natsmw.delay.deadline": _iso(deadline),
             "natsmw.delay.remaining_s": round(deadline - server_clock.now(real._client), 3),
             "natsmw.delay.handler_calls": calls},
        )  # fmt: skip
        try:
            await send(_ACK_PARKED)
        except NatsError as error:
            log.warning(
                "%s seq %s is parked, but the ack of the original was not confirmed (%r): "
                "if it comes back, it is acked then, not handled",
                msg.subject, parked.sequence, error,
            )  # fmt: skip
        return True

    # -- the handler's own settlement -------------------------------------------------------

    async def _defer(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        delivery: int,
        skipped: int,
        calls: int,
        delay: float,
        send: Settle,
    ) -> Any:
        """The handler asked for ``nak(delay)`` with ``delay`` over the cap: park, or record
        the deadline and cap the nak."""
        await self._measure_clock(
            msg, parking=self.park_after is not None and delay > self.park_after
        )
        deadline = server_clock.now(msg.__wrapped__._client) + delay
        traceparent = _traceparent(msg)
        real = msg.__wrapped__
        origin = real.parked if real.__class__ is DueMsg else key
        state = serving(real._client, origin.stream, origin.consumer)
        if self.park_after is not None and delay > self.park_after:
            if state == WANTED:
                await self._prepare_parking(msg, origin)
            if park_stream(msg.message._client).refused:
                self.stats.park_fallbacks += 1  # said when the stream was refused
        if (
            self.park_after is not None
            and delay > self.park_after
            and _too_big_to_park(msg.message)
        ):
            self.stats.park_fallbacks += 1
            log.warning(
                "%s seq %s is too big to park (%d bytes, max_payload %d with natsmw's headers): "
                "holding it with naks of at most %.3fs instead",
                msg.subject, _seq(msg), len(wire_body(msg.message)),
                msg.message._client.max_payload, self.cap,
            )  # fmt: skip
        limits = await self._limits_of(msg, key)
        decision = nak_decision(
            delay,
            cap=self.cap,
            # asked again: serving may have started or stopped during the awaits above
            park_after=self._park_threshold(
                msg, origin, limits, serving(real._client, origin.stream, origin.consumer)
            ),
            jitter=self.jitter,
            draw=random.random(),
            delivery=delivery,
            limits=limits,
        )
        if isinstance(decision, Park):
            if await self._park(msg, key, deadline, calls, delay, traceparent, send):
                return None
            decision = nak_decision(
                delay, cap=self.cap, park_after=None, jitter=self.jitter,
                draw=random.random(), delivery=delivery, limits=limits,
            )  # fmt: skip
        deferral = Deferral(
            deadline=deadline,
            deferred_at=delivery,
            skipped_before=skipped,
            requested=delay,
            stored_at=msg.metadata.timestamp.timestamp(),
            traceparent=traceparent,
            consumer_created=limits.created,
            subject=msg.subject,
        )
        await self._know_changes(msg, key)
        # Remembered even if the store refuses it: this instance then knows the deadline,
        # and that the whole delay went to the server, so it will not hold the redelivery blind.
        self._memory.seen(key, msg.__wrapped__._client, deferral, delivery)
        if isinstance(decision, Send):
            if limits.known:
                # max_deliver leaves no delivery: any nak, the handler's own included, is
                # the message's last on this consumer. Only parking (above) could keep it.
                log.error(
                    "%s seq %s: the handler naked it for %.3fs on its last allowed delivery "
                    "(max_deliver=%s): the server will not deliver it again to %s (it stays "
                    "in stream %s). Park it (a durable consumer whose due messages this process "
                    "serves), or raise max_deliver",
                    msg.subject, _seq(msg), delay, limits.max_deliver, key.consumer, key.stream,
                )  # fmt: skip
            return await self._uncapped(msg, delivery, delay, send, "max_deliver leaves no "
                                        "delivery to hold with, or cannot be read")  # fmt: skip
        try:
            await self._store_for(msg).put(key, deferral)
        except DeadlineStoreError as error:
            self.stats.store_errors += 1
            # Only this instance knows now: remembered past the memory's limit too.
            self._memory.seen(key, msg.__wrapped__._client, deferral, delivery, force=True)
            return await self._uncapped(
                msg, delivery, delay, send, f"the deadline could not be recorded: {error}"
            )
        assert isinstance(decision, Hold)
        if decision.stretched:
            self._stretched(msg, decision, delivery, delay, limits)
        if decision.nak < delay:
            self.stats.capped += 1
            msg.report(
                "natsmw.delay.capped",
                {"natsmw.delay.requested_s": delay, "natsmw.delay.cap_s": self.cap,
                 "natsmw.delay.nak_s": decision.nak, "natsmw.delay.deadline": _iso(deadline)},
            )  # fmt: skip
        return await send(nak_settlement(decision.nak))

    async def _cancelled(self, msg: MessageProxy, key: DeadlineKey) -> None:
        """An operator cancelled this deferred message: it never reaches the handler."""
        log.warning(
            "%s seq %s: cancelled by an operator (natsmw deferred cancel): terminating it "
            "without calling the handler", msg.subject, key.sequence,
        )  # fmt: skip
        self._memory.gone(key, msg.__wrapped__._client)
        await msg.term()

    async def _uncapped(
        self, msg: MessageProxy, delivery: int, delay: float, send: Settle, why: str
    ) -> Any:
        self.stats.uncapped += 1
        _survival(msg, "uncapped", delivery, delay)
        self._warn(
            "uncapped",
            "%s seq %s: %s; its %.3fs nak goes as the handler asked",
            msg.subject, _seq(msg), why, delay,
        )  # fmt: skip
        return await send(nak_settlement(delay))

    async def _release(
        self, msg: MessageProxy, key: DeadlineKey, deferral: Deferral, delivery: int
    ) -> int:
        """Count this handler call; note in the store where the holds of a deferral ended."""
        if deferral.released_at is None:
            deferral = replace(deferral, released_at=delivery)
            self._memory.seen(key, msg.__wrapped__._client, deferral, delivery)
            held = deferral.skipped(delivery) - deferral.skipped_before
            msg.report(
                "natsmw.delay.released",
                {"natsmw.delay.deadline": _iso(deferral.deadline),
                 "natsmw.delay.held_deliveries": held,
                 "natsmw.message.delivery_count": delivery},
                link=deferral.traceparent,
            )  # fmt: skip
            self._record_release(msg, key, deferral)
        # Handler calls under an earlier consumer of the same name count too.
        return deferral.calls_before + delivery - deferral.skipped(delivery)

    def _record_release(self, msg: MessageProxy, key: DeadlineKey, deferral: Deferral) -> None:
        """Write the release in the background: the handler does not wait for bookkeeping
        (a slow store would make every due message wait in turn). It may land after a later
        deferral of the message (by this instance or another): stores write a release only
        over the record of the deferral it releases ([`replaces`][natsmw.delay.stores.replaces])."""
        store = self._store_for(msg)

        async def write() -> None:
            try:
                await store.put(key, deferral)
            except DeadlineStoreError as error:
                self.stats.store_errors += 1
                self._warn("release", "could not record the release of %s: %s", key, error)

        task = asyncio.get_running_loop().create_task(write())
        self._writing.add(task)  # asyncio keeps only a weak reference to a running task
        task.add_done_callback(self._writing.discard)


def handler_calls(msg: Msg) -> int:
    """How many times the handler has been called for ``msg``, this call included.

    ``msg.metadata.num_delivered`` counts every delivery, holds included; this does not.
    Outside a [`with_delay_cap`][with_delay_cap] chain it is ``num_delivered``.

    Raises:
        nats.errors.NotJSMessageError: ``msg`` is not a JetStream message.
    """
    if isinstance(msg, MessageProxy) and _CALLS_KEY in msg.state:
        calls: int = msg.state[_CALLS_KEY]
        return calls
    return msg.metadata.num_delivered


def _survival(
    msg: MessageProxy, decision: str, delivery: int, remaining: float | None, **more: object
) -> None:
    """Report a decision that put the message's survival before the cap or the deadline."""
    attributes: dict[str, str | bool | int | float] = {
        "natsmw.delay.decision": decision,
        "natsmw.message.delivery_count": delivery,
    }
    if remaining is not None:
        attributes["natsmw.delay.remaining_s"] = remaining
    for name, value in more.items():
        if isinstance(value, (str, bool, int, float)):
            attributes[f"natsmw.delay.{name}"] = value
    msg.report("natsmw.delay.survival", attributes)


def _traceparent(msg: MessageProxy) -> str | None:
    """The W3C traceparent of the message's span, to link the handler's later run back to it.

    The span tracing put in ``msg.state``, else the current one.
    """
    span = msg.state.get(SPAN_KEY) or trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


_W3C = TraceContextTextMapPropagator()


# What natsmw adds to a parked copy (its record, the schedule headers), with room to spare.
_PARK_OVERHEAD = 4096


def _too_big_to_park(real: Msg) -> bool:
    limit = getattr(real._client, "max_payload", 0) or 0
    return bool(limit) and len(wire_body(real)) + _PARK_OVERHEAD > limit


def _closed(stores: dict[str | None, KeyValueDeadlineStore]) -> bool:
    return any(store.client_closed for store in stores.values())


def _key_of(msg: MessageProxy) -> DeadlineKey:
    """The deadline key of a JetStream delivery, read from its reply subject."""
    stream, consumer, sequence, _ = msg.position
    return _new_key((stream, consumer, sequence))


def _reply_numbers(real: Msg) -> tuple[int, float] | None:
    """The consumer sequence and the stored time (Unix seconds) of ``real``, from its reply
    subject: cheaper than parsing all of its metadata. ``None`` for another reply format."""
    reply = real.reply
    if reply.count(".") != 8:  # $JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ns>.<pending>
        return None
    _, cseq, stored, _ = reply.rsplit(".", 3)
    return int(cseq), int(stored) / 1e9


def _iso(moment: float) -> str:
    try:
        return format_deadline(datetime.fromtimestamp(moment, timezone.utc))
    except (ValueError, OverflowError, OSError):
        return f"unix {moment:.0f}"  # past year 9999: still say it, do not fail the nak


def _seq(msg: MessageProxy) -> int:
    return msg.position.stream_sequence
