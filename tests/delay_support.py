"""Helpers for the delay-cap tests: a recording legacy handler and nak payload parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from natsmw.delay import handler_calls

CAP = 0.2
DELAY = 2.0


@dataclass(frozen=True)
class Call:
    at: float
    num_delivered: int
    handler_calls: int


class LegacyHandler:
    """A handler as teams write it: nak for ``delay`` on the first call, ack after."""

    def __init__(self, delay: float | timedelta = DELAY) -> None:
        self.delay = delay
        self.calls: list[Call] = []
        self.asked_at: float | None = None
        self._changed = asyncio.Condition()
        self.deferred = asyncio.Event()  # set once the first call's nak has been sent

    async def __call__(self, msg: Msg) -> None:
        async with self._changed:
            self.calls.append(Call(time.time(), msg.metadata.num_delivered, handler_calls(msg)))
            self._changed.notify_all()
        if len(self.calls) == 1:
            self.asked_at = time.time()
            await msg.nak(delay=self.delay)
            self.deferred.set()
        else:
            await msg.ack()

    async def wait_calls(self, count: int, timeout: float = 10.0) -> list[Call]:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.calls) >= count), timeout
            )
        return self.calls[:count]

    @property
    def earliest_allowed(self) -> float:
        assert self.asked_at is not None
        seconds = self.delay.total_seconds() if isinstance(self.delay, timedelta) else self.delay
        return self.asked_at + seconds


def nak_delays(payloads: list[bytes]) -> list[float]:
    """The delays (seconds) of the naks among settlement payloads; 0.0 for a plain nak."""
    delays = []
    for payload in payloads:
        if payload.startswith(b"-NAK"):
            body = payload[4:].strip()
            delays.append(json.loads(body)["delay"] / 1e9 if body else 0.0)
    return delays


@contextlib.asynccontextmanager
async def pulling(
    js: JetStreamContext, subject: str, durable: str, handler: Callable[[Msg], Awaitable[None]]
) -> AsyncIterator[None]:
    """Fetch from a pull consumer in the background and hand each message to ``handler``."""
    psub = await js.pull_subscribe(subject, durable=durable)

    async def loop() -> None:
        while True:
            try:
                msgs = await psub.fetch(1, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            for msg in msgs:
                await handler(msg)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await psub.unsubscribe()
