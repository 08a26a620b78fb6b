"""Helpers for the delay-cap tests: a recording legacy handler and nak payload parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from natsmw.delay import DelayCap, handler_calls

CAP = 0.2
DELAY = 2.0


@dataclass(frozen=True)
class Call:
    at: float
    num_delivered: int
    handler_calls: int


class CallLog:
    """Records each call of a handler and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._changed = asyncio.Condition()

    async def record(self, msg: Msg) -> None:
        async with self._changed:
            self.calls.append(Call(time.time(), msg.metadata.num_delivered, handler_calls(msg)))
            self._changed.notify_all()

    async def wait_calls(self, count: int, timeout: float = 10.0) -> list[Call]:
        async with self._changed:
            enough = lambda: len(self.calls) >= count  # noqa: E731
            await asyncio.wait_for(self._changed.wait_for(enough), timeout)
        return self.calls[:count]


class LegacyHandler(CallLog):
    """A handler as teams write it: nak for ``delay`` on the first call, ack after."""

    def __init__(self, delay: float | timedelta = DELAY) -> None:
        super().__init__()
        self.delay = delay
        self.asked_at: float | None = None
        self.deferred = asyncio.Event()  # set once the first call's nak has been sent

    async def __call__(self, msg: Msg) -> None:
        await self.record(msg)
        if len(self.calls) == 1:
            self.asked_at = time.time()
            await msg.nak(delay=self.delay)
            self.deferred.set()
        else:
            await msg.ack()

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
    js: JetStreamContext,
    subject: str,
    durable: str,
    handler: Callable[[Msg], Awaitable[None]],
    batch: int = 1,
    *,
    together: bool = False,
) -> AsyncIterator[None]:
    """Fetch from a pull consumer in the background and hand each message to ``handler``
    (``together``: a batch's messages concurrently)."""
    psub = await js.pull_subscribe(subject, durable=durable)

    async def loop() -> None:
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            except nats.errors.Error:  # the server is restarting: as a real worker would
                await asyncio.sleep(0.05)
                continue
            if together:
                await asyncio.gather(*(handler(msg) for msg in msgs))
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


async def wait_until(moment: float) -> None:
    """Wait for the wall clock to pass ``moment``: the one thing a deadline test must wait for."""
    await asyncio.sleep(max(moment - time.time(), 0.0) + 0.01)


class ScriptedHandler(CallLog):
    """A handler that settles each call as its script says: ("nak", delay) or ("ack",)."""

    def __init__(self, *script: tuple[object, ...]) -> None:
        super().__init__()
        self.script = list(script)
        self.naked_at: list[float] = []
        self.settled = 0

    async def __call__(self, msg: Msg) -> None:
        step = self.script[min(len(self.calls), len(self.script) - 1)]
        await self.record(msg)
        if step[0] == "nak":
            self.naked_at.append(time.time())
            await msg.nak(delay=step[1])
        else:
            await msg.ack()
        async with self._changed:
            self.settled += 1
            self._changed.notify_all()

    async def wait_settled(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` calls have sent their settlement."""
        async with self._changed:
            enough = lambda: self.settled >= count  # noqa: E731
            await asyncio.wait_for(self._changed.wait_for(enough), timeout)


async def fetch_and_handle(
    psub: Any, handler: CallLog, calls: int, timeout: float = 10.0
) -> list[list[Msg]]:
    """A legacy pull worker: fetch, hand each message to ``handler``, until it was called
    ``calls`` times. Returns the batches fetch returned."""
    batches: list[list[Msg]] = []

    async def work() -> None:
        while len(handler.calls) < calls:
            try:
                batch = await psub.fetch(10, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            batches.append(batch)
            for msg in batch:
                await handler(msg)  # type: ignore[operator]

    await asyncio.wait_for(work(), timeout)
    return batches


async def releases_recorded(cap: DelayCap, timeout: float = 5.0) -> None:
    """Wait until the release records a cap writes in the background are written."""

    async def written() -> None:
        while cap._writing:
            await asyncio.gather(*cap._writing, return_exceptions=True)

    await asyncio.wait_for(written(), timeout)


async def serving(client: Client, stream: str, consumer: str, timeout: float = 5.0) -> None:
    """Wait until this process serves the due messages of ``stream``/``consumer`` (until
    then a long nak is held, not parked)."""
    from natsmw.delay.park import is_served

    async def served() -> None:
        while not is_served(client, stream, consumer):  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(served(), timeout)
