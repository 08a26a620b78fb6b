"""``with_delay_cap``: long ``nak(delay)`` calls become short ones, and the deadline holds.

A handler asks for ``nak(delay=3 * 3600)``. The server would keep the message in the
consumer's ack-pending set for three hours. Under ``@with_delay_cap(60)`` natsmw records the
deadline (now + 3 h) and naks for at most 60 s instead; every redelivery before the deadline is
*held*: naked again for ``min(cap, remaining)`` without calling the handler. The first delivery
after the deadline reaches the handler.

Deadlines come from a ``Natsmw-Deadline`` header (set by a publisher) or from a
:class:`~natsmw.delay.stores.DeadlineStore` (set by natsmw when a handler naks long).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from itertools import islice
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from natsmw.chain import Handler, middleware
from natsmw.delay.deadline import DEADLINE_HEADER, format_deadline, parse_deadline
from natsmw.delay.stores import DeadlineKey, DeadlineStore, Deferral, KeyValueDeadlineStore
from natsmw.duration import Duration, to_positive_seconds
from natsmw.errors import DeadlineStoreError
from natsmw.headers import peek_header
from natsmw.message import SPAN_KEY, MessageProxy, Settle, Settlement, SettlementKind

__all__ = ["DelayCap", "DelayCapStats", "handler_calls", "with_delay_cap"]

log = logging.getLogger("natsmw.delay")

# Added to a nak meant to land on the deadline: the server's timer starts after we measured
# "now", and a redelivery a hair early would cost one more hold (and one more delivery).
_SLACK = 0.005
_CALLS_KEY = "natsmw.delay.calls"
_CACHE_LIMIT = 100_000
_NAK_ONLY: frozenset[SettlementKind] = frozenset(("nak",))
_new_key = partial(tuple.__new__, DeadlineKey)  # skips NamedTuple's Python-level __new__


@dataclass
class DelayCapStats:
    """What one :class:`DelayCap` did, counted since it was created.

    Attributes:
        capped: handler naks longer than the cap that were sent capped.
        holds: deliveries held (naked again) without calling the handler.
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
    """

    capped: int = 0
    holds: int = 0
    stretched: int = 0
    uncapped: int = 0
    blind_holds: int = 0
    forced_runs: int = 0
    malformed_headers: int = 0
    store_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Found:
    deferral: Deferral | None
    recorded: bool  # whether the deferral is (or is to be) kept in the store
    known: bool = True  # False: the store could not be asked, and nothing is known locally


@dataclass(slots=True)
class _Local:
    """What this instance knows of one message: its deferral, and the last delivery it saw,
    on which client (the same stream and consumer names may exist on two servers)."""

    deferral: Deferral | None
    seen: int
    client: object


def with_delay_cap(
    cap: Duration, *, store: DeadlineStore | None = None, jitter: float = 0.1
) -> DelayCap:
    """Cap ``nak(delay)`` at ``cap`` and hold the message until the original deadline.

    Example::

        @with_delay_cap(timedelta(minutes=1))
        async def handle(msg):
            await msg.nak(delay=3 * 3600)   # the server sees naks of at most a minute

    Args:
        cap: the longest nak delay sent to the server (seconds or ``timedelta``).
        store: where deadlines asked for with ``nak`` are kept; by default a JetStream
            key-value bucket ``natsmw_deadlines`` on the message's own connection.
        jitter: capped intervals are shortened by up to this fraction, at random, so that many
            messages deferred together do not come back together. The deadline never moves.

    Raises:
        TypeError: ``cap`` is not a number of seconds or a ``timedelta``.
        ValueError: ``cap`` is zero, negative, NaN or infinite, or ``jitter`` is not in [0, 1).
    """
    return DelayCap(cap, store=store, jitter=jitter)


class DelayCap:
    """The delay-cap middleware; build it with :func:`with_delay_cap`.

    Apply it to a handler (``@with_delay_cap(60)``) or put it in :func:`~natsmw.compose`.
    ``stats`` counts what it did, across every handler it wraps.
    """

    def __init__(
        self, cap: Duration, *, store: DeadlineStore | None = None, jitter: float = 0.1
    ) -> None:
        self.cap = to_positive_seconds(cap, "cap")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        self.jitter = float(jitter)
        self.stats = DelayCapStats()
        self._store = store
        self._stores: weakref.WeakKeyDictionary[Client, DeadlineStore] = weakref.WeakKeyDictionary()
        self._local: dict[DeadlineKey, _Local] = {}
        self._limits = _ConsumerLimits()

    def __call__(self, handler: Handler) -> Handler:
        return middleware(self._step)(handler)

    def __repr__(self) -> str:
        return f"with_delay_cap({self.cap!r}, jitter={self.jitter!r})"

    async def _step(self, msg: MessageProxy, call_next: Handler) -> None:
        if not msg.is_jetstream:
            await call_next(msg)
            return
        stream, consumer, sequence, delivery = msg.position
        key = _new_key((stream, consumer, sequence))
        header = self._header_deferral(msg)
        local = self._known(msg, key, delivery)
        if (
            header is None
            and local is not None
            and local.deferral is not None
            and local.deferral.deadline > time.time()
        ):
            # The usual hold, on the instance that deferred the message: only a handler run
            # can move a deadline, and none ran since this instance last saw the message.
            if await self._hold(msg, key, local.deferral, delivery):
                if self._local.get(key) is local:
                    local.seen = delivery  # one delivery later, the same deadline
                else:  # forgotten while the hold was sent (evicted): remember it again
                    self._remember(msg, key, local.deferral, delivery)
                return
            found = _Found(local.deferral, recorded=True)  # a forced run
        elif header is None and local is None and delivery == 1:
            found = _NOTHING  # the hot path: nothing to look up for a first, plain delivery
        else:
            found = await self._find(msg, key, delivery, header, local)
            if await self._held(msg, key, found, delivery):
                return
        deferral = found.deferral
        calls = delivery if deferral is None else await self._release(msg, key, deferral, delivery)
        if calls != delivery:  # handler_calls() falls back to num_delivered
            msg.state[_CALLS_KEY] = calls

        cap = self.cap

        async def on_settle(settlement: Settlement, send: Settle) -> Any:
            if settlement.delay is None or settlement.delay <= cap:
                return await send(settlement)
            return await self._defer(msg, key, delivery, delivery - calls, settlement.delay, send)

        try:
            with msg.intercept(on_settle, kinds=_NAK_ONLY):
                await call_next(msg)
        finally:
            self._after_call(msg, key, delivery, deferral)

    # -- finding the deadline ---------------------------------------------------------------

    async def _find(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        delivery: int,
        header: Deferral | None,
        local: _Local | None,
    ) -> _Found:
        now = time.time()
        if header is not None and header.deadline > now:
            return _Found(header, recorded=False)
        if local is not None and local.deferral is not None and local.deferral.deadline > now:
            # Only a handler run can move a deadline, and no handler runs before this one.
            return _Found(local.deferral, recorded=True)
        if local is not None and local.seen == delivery - 1:
            # This instance saw every delivery since it last looked: nobody else ran the
            # handler, so what it knows is all there is.
            return _Found(local.deferral or header, recorded=local.deferral is not None)
        if local is None and delivery == 1:
            return _Found(header, recorded=False)  # records are written when a handler naks
        try:
            stored = await self._store_for(msg).get(key)
        except DeadlineStoreError as error:
            self.stats.store_errors += 1
            log.warning("deadline store unreachable for %s: %s", key, error)
            return _Found(None, recorded=False, known=False)
        if stored is not None and not stored.fits(delivery, msg.metadata.timestamp.timestamp()):
            log.warning(
                "ignoring a deadline record for %s left by an earlier stream or consumer", key
            )
            stored = None
        if stored is None:
            return _Found(header, recorded=False)
        return _Found(stored, recorded=True)

    def _header_deferral(self, msg: MessageProxy) -> Deferral | None:
        value = peek_header(msg.__wrapped__, DEADLINE_HEADER)  # not through the proxy: faster
        if value is None:
            return None
        stored_at = msg.metadata.timestamp.timestamp()
        try:
            deadline = parse_deadline(value).timestamp()
        except ValueError as error:
            self.stats.malformed_headers += 1
            log.warning("ignoring the deadline of %s seq %s: %s", msg.subject, _seq(msg), error)
            return None
        if deadline <= stored_at:
            return None  # due before the message was even stored: nothing to hold
        return Deferral(deadline=deadline, stored_at=stored_at)

    def _store_for(self, msg: MessageProxy) -> DeadlineStore:
        if self._store is not None:
            return self._store
        client = msg.__wrapped__._client
        store = self._stores.get(client)
        if store is None:
            store = self._stores[client] = KeyValueDeadlineStore(client.jetstream())
        return store

    def _known(self, msg: MessageProxy, key: DeadlineKey, delivery: int) -> _Local | None:
        """What this instance remembers of ``msg``, if it can be about this very message.

        Not when it was learnt on another client, nor when it claims a delivery this one
        does not follow (a stream or consumer recreated under the same names).
        """
        local = self._local.get(key)
        if local is None:
            return None
        if local.client is not msg.__wrapped__._client or local.seen >= delivery:
            del self._local[key]
            return None
        return local

    def _remember(
        self, msg: MessageProxy, key: DeadlineKey, deferral: Deferral | None, seen: int
    ) -> None:
        self._local[key] = _Local(deferral, seen, msg.__wrapped__._client)
        if len(self._local) > _CACHE_LIMIT:
            # Forget the oldest tenth at once, so that eviction costs O(1) per message.
            for old in list(islice(self._local, _CACHE_LIMIT // 10)):
                del self._local[old]

    def _after_call(
        self, msg: MessageProxy, key: DeadlineKey, delivery: int, deferral: Deferral | None
    ) -> None:
        settlement = msg.settlement
        if settlement is not None and settlement.kind != "nak":
            self._local.pop(key, None)  # acked or termed: it will not come back
            return
        if settlement is None and deferral is None:
            # Unsettled here: nats-py's auto-ack will settle it, or, rarely, ack_wait will
            # bring it back (a store read then). Remembering every such message would fill
            # the memory of auto-ack consumers for nothing.
            return
        local = self._local.get(key)
        if local is not None and local.seen == delivery:
            return  # the handler deferred it: _defer remembered the new deadline
        self._remember(msg, key, deferral, delivery)

    # -- holding ----------------------------------------------------------------------------

    async def _held(
        self, msg: MessageProxy, key: DeadlineKey, found: _Found, delivery: int
    ) -> bool:
        """Hold the delivery if its deadline is ahead (or unknown); say whether it was held."""
        if not found.known:
            return await self._hold_blind(msg, key, delivery)
        deferral = found.deferral
        if deferral is None or deferral.deadline <= time.time():
            return False
        held = await self._hold(msg, key, deferral, delivery)
        if held and found.recorded:
            local = self._local.get(key)
            if local is not None and local.deferral is deferral:
                local.seen = delivery  # the usual hold: same deadline, one delivery later
            else:
                self._remember(msg, key, deferral, delivery)
        return held

    async def _hold(
        self, msg: MessageProxy, key: DeadlineKey, deferral: Deferral, delivery: int
    ) -> bool:
        remaining = deferral.deadline - time.time()
        interval = await self._interval(msg, key, delivery, remaining)
        if interval is None:
            self._forced_run(msg, delivery, remaining)
            return False
        self.stats.holds += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("holding %s seq %s for %.3fs more", msg.subject, _seq(msg), remaining)
        msg.report(
            "natsmw.delay.hold",
            {"natsmw.delay.remaining_s": remaining, "natsmw.delay.nak_s": interval,
             "messaging.nats.message.delivery_count": delivery},
        )  # fmt: skip
        await msg.nak(interval)
        return True

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

    async def _hold_blind(self, msg: MessageProxy, key: DeadlineKey, delivery: int) -> bool:
        interval = await self._interval(msg, key, delivery, self.cap)
        if interval is None:
            self._forced_run(msg, delivery, None)
            return False
        self.stats.blind_holds += 1
        msg.report(
            "natsmw.delay.blind_hold",
            {"natsmw.delay.nak_s": interval, "messaging.nats.message.delivery_count": delivery},
        )
        log.warning(
            "holding %s seq %s for %.3fs: the deadline store is unreachable, so whether it "
            "has a deadline is unknown",
            msg.subject, _seq(msg), interval,
        )  # fmt: skip
        await msg.nak(interval)
        return True

    async def _interval(
        self, msg: MessageProxy, key: DeadlineKey, delivery: int, remaining: float
    ) -> float | None:
        """The nak delay for a hold with ``remaining`` seconds to go.

        ``None`` when no nak is safe: this may be the consumer's last allowed delivery.
        """
        max_deliver = await self._limits.max_deliver(msg, key)
        if max_deliver is _UNKNOWN:
            return None
        left = max_deliver - delivery if isinstance(max_deliver, int) else None
        if left is not None and left <= 0:
            return None
        interval = min(self.cap, remaining)
        if interval < remaining and self.jitter:
            interval *= 1 - self.jitter * random.random()
        if left is not None and remaining / left > interval:
            # Survival over the cap: spread what remains over the deliveries left, so the
            # last one still reaches the handler after the deadline.
            interval = remaining / left
            self.stats.stretched += 1
            _survival(
                msg, "stretched", delivery, remaining, max_deliver=max_deliver, nak_s=interval
            )
            log.warning(
                "nak of %s seq %s stretched to %.3fs (cap %.3fs): max_deliver=%s leaves %s "
                "deliveries for %.3fs",
                msg.subject, _seq(msg), interval, self.cap, max_deliver, left, remaining,
            )  # fmt: skip
        return remaining + _SLACK if interval >= remaining else interval

    # -- the handler's own settlement -------------------------------------------------------

    async def _defer(
        self,
        msg: MessageProxy,
        key: DeadlineKey,
        delivery: int,
        skipped: int,
        delay: float,
        send: Settle,
    ) -> Any:
        """The handler asked for ``nak(delay)`` with ``delay`` over the cap: record, then cap."""
        deferral = Deferral(
            deadline=time.time() + delay,
            deferred_at=delivery,
            skipped_before=skipped,
            requested=delay,
            stored_at=msg.metadata.timestamp.timestamp(),
            traceparent=_traceparent(msg),
        )
        # Remembered even if the store refuses it: this instance then knows the deadline,
        # and that the whole delay went to the server, so it will not hold the redelivery blind.
        self._remember(msg, key, deferral, delivery)
        try:
            await self._store_for(msg).put(key, deferral)
        except DeadlineStoreError as error:
            self.stats.store_errors += 1
            self.stats.uncapped += 1
            _survival(msg, "uncapped", delivery, delay)
            log.warning(
                "could not record the deadline of %s seq %s (%s): sending the %.3fs nak uncapped",
                msg.subject, _seq(msg), error, delay,
            )  # fmt: skip
            return await send(Settlement("nak", delay=delay))
        interval = await self._interval(msg, key, delivery, delay)
        if interval is None:
            self.stats.uncapped += 1
            _survival(msg, "uncapped", delivery, delay)
            log.warning(
                "%s seq %s: max_deliver leaves no delivery to hold with, or cannot be read; "
                "its %.3fs nak goes as the handler asked",
                msg.subject, _seq(msg), delay,
            )  # fmt: skip
            return await send(Settlement("nak", delay=delay))
        if interval < delay:
            self.stats.capped += 1
            msg.report(
                "natsmw.delay.capped",
                {"natsmw.delay.requested_s": delay, "natsmw.delay.cap_s": self.cap,
                 "natsmw.delay.nak_s": interval, "natsmw.delay.deadline": _iso(deferral.deadline)},
            )  # fmt: skip
        return await send(Settlement("nak", delay=interval))

    async def _release(
        self, msg: MessageProxy, key: DeadlineKey, deferral: Deferral, delivery: int
    ) -> int:
        """Count this handler call; note in the store where the holds of a deferral ended."""
        if deferral.released_at is None:
            deferral = replace(deferral, released_at=delivery)
            self._remember(msg, key, deferral, delivery)
            held = deferral.skipped(delivery) - deferral.skipped_before
            msg.report(
                "natsmw.delay.released",
                {"natsmw.delay.deadline": _iso(deferral.deadline),
                 "natsmw.delay.held_deliveries": held,
                 "messaging.nats.message.delivery_count": delivery},
                link=deferral.traceparent,
            )  # fmt: skip
            try:
                await self._store_for(msg).put(key, deferral)
            except DeadlineStoreError as error:
                self.stats.store_errors += 1
                log.warning("could not record the release of %s: %s", key, error)
        return delivery - deferral.skipped(delivery)


def handler_calls(msg: Msg) -> int:
    """How many times the handler has been called for ``msg``, this call included.

    ``msg.metadata.num_delivered`` counts every delivery, holds included; this does not.
    Outside a :func:`with_delay_cap` chain it is ``num_delivered``.

    Raises:
        nats.errors.NotJSMessageError: ``msg`` is not a JetStream message.
    """
    if isinstance(msg, MessageProxy) and _CALLS_KEY in msg.state:
        calls: int = msg.state[_CALLS_KEY]
        return calls
    return msg.metadata.num_delivered


_NOTHING = _Found(None, recorded=False)


class _Unknown:
    pass


_UNKNOWN = _Unknown()
_LIMITS_TTL = 60.0
_LIMITS_RETRY = 5.0


class _ConsumerLimits:
    """The consumers' ``max_deliver``, read with consumer info.

    Refreshed every minute; a value once read is kept when a refresh fails, and a failed read
    is not retried for a few seconds (every hold would otherwise wait for it).
    """

    def __init__(self) -> None:
        # Keyed by client too: the same stream and consumer names may exist on two servers.
        # The value, and when to read it again.
        self._known: dict[tuple[object, str, str], tuple[int | _Unknown | None, float]] = {}

    async def max_deliver(self, msg: MessageProxy, key: DeadlineKey) -> int | _Unknown | None:
        """``max_deliver`` (``None``: unlimited), or ``_UNKNOWN`` if it was never read."""
        client = msg.__wrapped__._client
        consumer = (client, key.stream, key.consumer)
        known = self._known.get(consumer)
        if known is not None and time.monotonic() < known[1]:
            return known[0]
        try:
            js = client.jetstream(domain=msg.metadata.domain or None)
            info = await js.consumer_info(key.stream, key.consumer, timeout=2.0)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            log.warning("cannot read consumer info of %s/%s: %s", key.stream, key.consumer, error)
            value = _UNKNOWN if known is None else known[0]
            self._known[consumer] = (value, time.monotonic() + _LIMITS_RETRY)
            return value
        limit = info.config.max_deliver
        value = limit if limit is not None and limit > 0 else None
        self._known[consumer] = (value, time.monotonic() + _LIMITS_TTL)
        return value


def _survival(
    msg: MessageProxy, decision: str, delivery: int, remaining: float | None, **more: object
) -> None:
    """Report a decision that put the message's survival before the cap or the deadline."""
    attributes: dict[str, str | bool | int | float] = {
        "natsmw.delay.decision": decision,
        "messaging.nats.message.delivery_count": delivery,
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


def _iso(moment: float) -> str:
    return format_deadline(datetime.fromtimestamp(moment, timezone.utc))


def _seq(msg: MessageProxy) -> int:
    return msg.position.stream_sequence
