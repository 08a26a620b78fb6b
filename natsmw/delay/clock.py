"""The server's clock, as seen from this host: deadlines are compared in the server's time.

Deadlines are written by one instance and compared by another. Wall clocks differ between
hosts, so a host whose clock runs 10 s ahead would run handlers 10 s early. The server stamps
every message it stores: natsmw writes a small probe message, reads back its stamp, and so
measures how far this host's clock is from the server's, to within the probe's round trip::

    t0 <= stamp + offset <= t1      (t0, t1: this host's clock around the publish)

Deadlines natsmw writes and compares are in the server's time (``time.time() - offset``).
The offset is measured again every few minutes, where natsmw already writes (its deadline
bucket, its park stream); until a first measurement it is taken as zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

__all__ = ["LARGE_OFFSET", "ServerClock", "server_clock"]

log = logging.getLogger("natsmw.delay")

LARGE_OFFSET = 1.0
"""An offset worth a warning (seconds): the hosts' clocks should be synchronised (NTP)."""

_REMEASURE = 300.0
_PROBE_TTL = 60  # seconds the probe message stays in the stream


class ServerClock:
    """Per client: how far this host's wall clock is ahead of the server's (seconds)."""

    def __init__(self) -> None:
        # By id(client), read on every deadline comparison; the entry goes with its client.
        self._offsets: dict[int, float] = {}
        self._measured: dict[int, float] = {}  # monotonic time of the last measurement
        self._measuring: dict[int, asyncio.Future[None]] = {}
        self._unmeasurable: set[int] = set()

    def offset(self, client: Client) -> float:
        """This host's clock minus the server's; 0.0 until measured."""
        return self._offsets.get(id(client), 0.0)

    def now(self, client: Client) -> float:
        """The server's current time (Unix seconds), as far as this host can tell."""
        return time.time() - self._offsets.get(id(client), 0.0)

    def stale(self, client: Client) -> bool:
        measured = self._measured.get(id(client))
        return measured is None or time.monotonic() - measured > _REMEASURE

    async def measure(
        self, client: Client, js: JetStreamContext, stream: str, subject: str
    ) -> None:
        """Measure the offset with one probe message to ``subject`` in ``stream`` (which must
        allow per-message TTL), unless it was measured a short while ago. Callers that come
        while it is measured wait for it. Never raises: a failed probe keeps the last offset,
        says so once, and is tried again later."""
        key = id(client)
        pending = self._measuring.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        if not self.stale(client):
            return
        pending = self._measuring[key] = asyncio.get_running_loop().create_future()
        try:
            await self._probe(client, js, stream, subject)
        finally:
            del self._measuring[key]
            pending.set_result(None)

    def unmeasurable(self, client: Client, why: str) -> None:
        """Say once per client that its offset cannot be measured (it stays as it is)."""
        key = id(client)
        if key in self._unmeasurable:
            return
        self._unmeasurable.add(key)
        weakref.finalize(client, self._unmeasurable.discard, key)
        log.warning(
            "cannot measure this host's clock against the server's (%s): deadlines are "
            "compared with this host's clock; keep the clocks synchronised (NTP)",
            why,
        )

    async def _probe(self, client: Client, js: JetStreamContext, stream: str, subject: str) -> None:
        key = id(client)
        try:
            before = time.time()
            ack = await js.publish(subject, b"", timeout=2.0, msg_ttl=_PROBE_TTL)
            after = time.time()
            stored = await js.get_msg(stream, ack.seq)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self.unmeasurable(client, f"a probe in {stream} failed: {error!r}")
            self._measured[key] = time.monotonic() - _REMEASURE + 30.0  # again in 30 s
            return
        if stored.time is None:
            return
        stamp = stored.time.timestamp()
        offset = ((before - stamp) + (after - stamp)) / 2
        if key not in self._measured:
            weakref.finalize(client, self._forget, key)
        self._offsets[key] = offset
        self._measured[key] = time.monotonic()
        if abs(offset) > LARGE_OFFSET:
            log.warning(
                "this host's clock is %.3fs %s the server's (measured to within %.3fs): "
                "natsmw compares deadlines in the server's time, but synchronise the clocks "
                "(NTP): publishers' deadlines are written in their own",
                abs(offset), "ahead of" if offset > 0 else "behind", (after - before) / 2,
            )  # fmt: skip

    def _forget(self, key: int) -> None:
        self._offsets.pop(key, None)
        self._measured.pop(key, None)


server_clock = ServerClock()
"""The one clock every delay cap and store of this process shares."""
