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
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

__all__ = ["LARGE_OFFSET", "ServerClock", "server_clock"]

log = logging.getLogger("natsmw.delay")

LARGE_OFFSET = 1.0
"""An offset worth a warning (seconds): the hosts' clocks should be synchronised (NTP)."""

_REMEASURE = 300.0
_PROBE_TTL = 60  # seconds the probe message stays in the stream


@dataclass
class _Reading:
    offset: float = 0.0
    measured: float | None = None  # monotonic time of the last measurement (or failed try)
    measuring: asyncio.Future[None] | None = None
    unmeasurable_said: bool = False


class ServerClock:
    """Per client: how far this host's wall clock is ahead of the server's (seconds)."""

    def __init__(self) -> None:
        # By id(client), read on every deadline comparison. Every entry goes with its client
        # (one finalizer, made with the entry): ids are reused, a stale entry would pass for
        # a new client's.
        self._readings: dict[int, _Reading] = {}

    def _reading(self, client: Client) -> _Reading:
        key = id(client)
        reading = self._readings.get(key)
        if reading is None:
            reading = self._readings[key] = _Reading()
            weakref.finalize(client, self._readings.pop, key, None)
        return reading

    def offset(self, client: Client) -> float:
        """This host's clock minus the server's; 0.0 until measured."""
        reading = self._readings.get(id(client))
        return 0.0 if reading is None else reading.offset

    def now(self, client: Client) -> float:
        """The server's current time (Unix seconds), as far as this host can tell."""
        reading = self._readings.get(id(client))
        return time.time() if reading is None else time.time() - reading.offset

    def stale(self, client: Client) -> bool:
        reading = self._readings.get(id(client))
        measured = None if reading is None else reading.measured
        return measured is None or time.monotonic() - measured > _REMEASURE

    async def measure(
        self, client: Client, js: JetStreamContext, stream: str, subject: str
    ) -> None:
        """Measure the offset with one probe message to ``subject`` in ``stream`` (which must
        allow per-message TTL), unless it was measured a short while ago. Callers that come
        while it is measured wait for it. Never raises: a failed probe keeps the last offset,
        says so once, and is tried again later."""
        reading = self._reading(client)
        pending = reading.measuring
        if pending is not None:
            await asyncio.shield(pending)
            return
        if not self.stale(client):
            return
        pending = reading.measuring = asyncio.get_running_loop().create_future()
        try:
            await self._probe(client, reading, js, stream, subject)
        finally:
            reading.measuring = None
            pending.set_result(None)

    def unmeasurable(self, client: Client, why: str) -> None:
        """Say once per client that its offset cannot be measured (it stays as it is)."""
        reading = self._reading(client)
        if reading.unmeasurable_said:
            return
        reading.unmeasurable_said = True
        log.warning(
            "cannot measure this host's clock against the server's (%s): deadlines are "
            "compared with this host's clock; keep the clocks synchronised (NTP)",
            why,
        )

    async def _probe(
        self, client: Client, reading: _Reading, js: JetStreamContext, stream: str, subject: str
    ) -> None:
        try:
            before = time.time()
            ack = await js.publish(subject, b"", timeout=2.0, msg_ttl=_PROBE_TTL)
            after = time.time()
            stored = await js.get_msg(stream, ack.seq)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self.unmeasurable(client, f"a probe in {stream} failed: {error!r}")
            reading.measured = time.monotonic() - _REMEASURE + 30.0  # again in 30 s
            return
        if stored.time is None:
            return
        stamp = stored.time.timestamp()
        offset = ((before - stamp) + (after - stamp)) / 2
        reading.offset = offset
        reading.measured = time.monotonic()
        if abs(offset) > LARGE_OFFSET:
            log.warning(
                "this host's clock is %.3fs %s the server's (measured to within %.3fs): "
                "natsmw compares deadlines in the server's time, but synchronise the clocks "
                "(NTP): publishers' deadlines are written in their own",
                abs(offset), "ahead of" if offset > 0 else "behind", (after - before) / 2,
            )  # fmt: skip


server_clock = ServerClock()
"""The one clock every delay cap and store of this process shares."""
