"""What the delay cap must know of a consumer: ``max_deliver``, and whether it is durable."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy

__all__ = ["ConsumerLimits", "Limits"]

log = logging.getLogger("natsmw.delay")

_TTL = 60.0
_PRUNE_ABOVE = 256
_RETRY = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A consumer's limits as read from its info.

    Attributes:
        max_deliver: deliveries allowed per message; ``None``: unlimited.
        durable: whether the consumer is durable (a parked message can find it again).
        ack_explicit: whether each message is acked on its own (not ack-all: there, the ack
            of a parked original would ack every earlier message too).
        known: ``False`` when the info could never be read: nothing is proven safe.
        created: when the consumer was created (Unix time, the server's clock): a consumer
            deleted and made again under the same name is another generation.
    """

    max_deliver: int | None
    durable: bool
    ack_explicit: bool = True
    known: bool = True
    created: float | None = None


UNKNOWN = Limits(max_deliver=None, durable=False, ack_explicit=False, known=False)


class ConsumerLimits:
    """Consumer limits, read with consumer info and cached per client and consumer.

    Refreshed every minute; a value once read is kept when a refresh fails, and a failed read
    is not retried for a few seconds (every hold would otherwise wait for it). Entries go with
    their client.
    """

    def __init__(self) -> None:
        # By id(client), not a WeakKeyDictionary (its get is Python code, and this is read on
        # every hold); the entry goes when the client does. Each value: the limits, when they
        # were last read or tried (monotonic), until when they may be used at all, and
        # whether that try failed.
        self._known: dict[int, dict[tuple[str, str], tuple[Limits, float, float, bool]]] = {}
        # One request per consumer at a time: concurrent handlers wait for the same answer.
        self._asking: dict[tuple[int, str, str], asyncio.Future[Limits]] = {}

    def cached(
        self, client: Client, stream: str, consumer: str, max_age: float | None = None
    ) -> Limits | None:
        """The limits if they are cached and fresh, without a server round trip.

        ``max_age``: fresh only if read (or tried, and kept after a failed read) at most
        this many seconds ago.
        """
        known = self._known.get(id(client))
        entry = None if known is None else known.get((stream, consumer))
        if entry is None:
            return None
        now = time.monotonic()
        # A read that failed a moment ago is not tried again, however fresh the caller
        # wants it: every hold would wait for a server that cannot answer.
        if now < entry[2] and (max_age is None or entry[3] or now - entry[1] <= max_age):
            return entry[0]
        return None

    async def read(
        self,
        client: Client,
        stream: str,
        consumer: str,
        domain: str | None = None,
        *,
        max_age: float | None = None,
    ) -> Limits:
        """The consumer's limits; [`UNKNOWN`][UNKNOWN] if they could never be read.

        ``max_age``: read them again if the cached value is older (see [`cached`][cached]).
        """
        fresh = self.cached(client, stream, consumer, max_age)
        if fresh is not None:
            return fresh
        asking = (id(client), stream, consumer)
        pending = self._asking.get(asking)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this caller was cancelled
                # the one asking was cancelled: ask ourselves
        try:
            future: asyncio.Future[Limits] = asyncio.get_running_loop().create_future()
        except RuntimeError:  # driven without an event loop (bench.micro): nothing to share
            return await self._ask(client, stream, consumer, domain)
        self._asking[asking] = future
        try:
            value = await self._ask(client, stream, consumer, domain)
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._asking.get(asking) is future:
                del self._asking[asking]
        future.set_result(value)
        return value

    async def _ask(self, client: Client, stream: str, consumer: str, domain: str | None) -> Limits:
        known = self._known.get(id(client))
        if known is None:
            known = self._known[id(client)] = {}
            weakref.finalize(client, self._known.pop, id(client), None)
        entry = known.get((stream, consumer))
        try:
            js = client.jetstream(domain=domain or None)
            info = await js.consumer_info(stream, consumer, timeout=2.0)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            log.warning("cannot read consumer info of %s/%s: %s", stream, consumer, error)
            value = UNKNOWN if entry is None else entry[0]
            now = time.monotonic()
            known[(stream, consumer)] = (value, now, now + _RETRY, True)
            return value
        limit = info.config.max_deliver
        value = Limits(
            max_deliver=limit if limit is not None and limit > 0 else None,
            durable=bool(info.config.durable_name),
            ack_explicit=info.config.ack_policy in (None, AckPolicy.EXPLICIT),
            created=info.created.timestamp() if info.created is not None else None,
        )
        now = time.monotonic()
        known[(stream, consumer)] = (value, now, now + _TTL, False)
        if len(known) > _PRUNE_ABOVE:
            # Ephemeral and ordered consumers come and go under new names: forget the
            # entries nobody read again in time.
            # An entry kept through failed reads is tried again every few seconds: it stays.
            for stale in [name for name, e in known.items() if e[2] < now and now - e[1] > _TTL]:
                del known[stale]
        return value
