"""A deadline store that cannot be reached costs one timeout, not one per message, and the
handler never waits for natsmw's bookkeeping (real servers)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

import natsmw.delay.stores
from natsmw import (
    compose,
    install,
    publish_not_before,
    uninstall,
    with_claim_check,
    with_delay_cap,
)
from natsmw.delay import DeadlineKey, Deferral, KeyValueDeadlineStore, MemoryDeadlineStore
from natsmw.delay.decision import BLIND_HOLD
from natsmw.errors import DeadlineStoreError
from natsmw.server import NatsServer
from tests.conftest import Connection, Inbox, Stream, connect, flushed
from tests.delay_support import CAP, CallLog


async def test_an_unreachable_bucket_is_asked_once_not_once_per_waiting_read(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight reads at once while the JetStream API does not answer: the first waits its
    timeout, the others fail with it (they queued behind one opening of the bucket), and
    reads fail at once until ``retry_after`` has passed."""
    swallowed = Inbox()
    await conn.nc.subscribe("$SINK.API.>", cb=swallowed.put)  # a responder that never answers
    store = KeyValueDeadlineStore(
        conn.nc.jetstream(prefix="$SINK.API"), timeout=0.3, retry_after=30.0
    )
    key = DeadlineKey("S", "c", 1)

    results = await asyncio.gather(*(store.get(key) for _ in range(8)), return_exceptions=True)
    assert all(isinstance(result, DeadlineStoreError) for result in results), results
    await flushed(conn.nc)
    assert len(swallowed.items) == 1
    with pytest.raises(DeadlineStoreError, match="not asked again"):
        await store.put(key, Deferral(deadline=0.0))
    await flushed(conn.nc)
    assert len(swallowed.items) == 1

    # Past retry_after, on the store's clock only (asyncio keeps the real one).
    later = time.monotonic() + 31.0
    monkeypatch.setattr(
        natsmw.delay.stores, "time", SimpleNamespace(time=time.time, monotonic=lambda: later)
    )
    with pytest.raises(DeadlineStoreError, match="cannot open"):
        await store.get(key)
    await flushed(conn.nc)
    assert len(swallowed.items) == 2  # asked again once the pause is over


_sequences = itertools.count(1)


class HangingStore:
    """A deadline store whose writes hang until released (a store in trouble)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.puts = 0

    async def get(self, key: DeadlineKey) -> Deferral | None:
        return None

    async def put(self, key: DeadlineKey, deferral: Deferral) -> None:
        self.puts += 1
        await self.release.wait()


async def test_due_messages_do_not_wait_for_their_release_to_be_recorded(
    conn: Connection, stream: Stream
) -> None:
    """A push subscription runs callbacks one at a time: were the release written before
    the handler ran, each due message would wait for the one before's write."""
    store = HangingStore()
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    cap = with_delay_cap(CAP, parking=False, store=store)
    for _ in range(5):
        await publish_not_before(conn.js, stream.subject, b"x", not_before=0.3)
    await conn.js.subscribe(stream.subject, durable="due", cb=cap(acks), manual_ack=True)
    try:
        await calls.wait_calls(5)
        assert store.puts == 5  # each release is written, in the background
    finally:
        store.release.set()


@pytest.mark.parametrize("kind", ["kv", "memory"])
async def test_a_late_release_never_replaces_a_later_deferral(conn: Connection, kind: str) -> None:
    """A release is written in the background and can land after the handler (here or on
    another instance) deferred the message again: the later deadline must stand, or the
    next delivery would run before it."""
    store = KeyValueDeadlineStore(conn.js) if kind == "kv" else MemoryDeadlineStore()
    key = DeadlineKey("LATE", "c", next(_sequences))
    now = time.time()
    first = Deferral(deadline=now + 1, deferred_at=1)
    await store.put(key, first)
    release = replace(first, released_at=5)
    later = Deferral(deadline=now + 3, deferred_at=6)
    await store.put(key, later)  # another instance deferred it again meanwhile

    await store.put(key, release)  # the release lands late
    assert await store.get(key) == later

    other = DeadlineKey("LATE", "c", next(_sequences))
    await store.put(other, first)
    await store.put(other, release)  # in time: it replaces the deferral it releases
    assert await store.get(other) == release


async def test_an_error_the_server_answers_at_once_does_not_open_the_breaker(
    conn: Connection,
) -> None:
    """No responders comes back at once (a bucket still being made on a cluster, say): it
    costs nothing to ask again, so the next read asks the server, not the breaker."""
    store = KeyValueDeadlineStore(conn.nc.jetstream(prefix="$NOBODY.API"), retry_after=60.0)
    key = DeadlineKey("S", "c", 1)
    for _ in range(2):
        with pytest.raises(DeadlineStoreError) as raised:
            await store.get(key)
        assert "did not answer a moment ago" not in str(raised.value)


class UnreachableStore:
    """A deadline store that can be neither read nor written until ``back`` is set (an
    outage), and holds nothing after it."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.failed_twice = asyncio.Event()
        self._failed = 0

    async def get(self, key: DeadlineKey) -> Deferral | None:
        if not self.back.is_set():
            self._failed += 1
            if self._failed >= 2:
                self.failed_twice.set()
            raise DeadlineStoreError("unreachable")
        return None

    async def put(self, key: DeadlineKey, deferral: Deferral) -> None:
        raise DeadlineStoreError("unreachable")


class FailsOnce:
    """A legacy handler that raises on its first call (no ack: ack_wait redelivers it)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self, msg: Msg) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) == 1:
            raise RuntimeError("a handler error, not a deferral")
        await msg.ack()
        self.done.set()


async def test_a_redelivery_nobody_deferred_waits_a_second_not_the_cap_when_blind(
    conn: Connection, stream: Stream
) -> None:
    """Held blind while the store is out (never early), but a second, then two: once the
    store is back, it runs within a few seconds, not after the rest of a 60 s cap."""
    handler = FailsOnce()
    store = UnreachableStore()
    cap = with_delay_cap(60, parking=False, store=store)
    await conn.js.subscribe(
        stream.subject, durable="blind", cb=cap(handler), manual_ack=True,
        config=ConsumerConfig(ack_wait=1),
    )  # fmt: skip
    await conn.js.publish(stream.subject, b"x")
    await asyncio.wait_for(store.failed_twice.wait(), 10)  # held 1 s, then 2 s, blind
    store.back.set()
    back_at = time.monotonic()
    await asyncio.wait_for(handler.done.wait(), 15)

    assert len(handler.calls) == 2
    assert handler.calls[1] - back_at < 2 * BLIND_HOLD + 1  # the hold under way, then it runs


@pytest.mark.parametrize("way", ["decorated", "installed"])
async def test_a_redelivery_never_creates_the_deadline_bucket(way: str) -> None:
    """The README: nothing is created on the server until a message is first deferred (nor
    by install(), which serves parked messages, nor by a claim check with no claim)."""
    async with NatsServer() as server:
        conn = await connect(server.url)
        await conn.js.add_stream(name="OWN", subjects=["own.>"])
        handler = FailsOnce()
        if way == "installed":
            install(conn.nc, chain=compose(with_delay_cap(60), with_claim_check()))
            callback: Any = handler
        else:
            callback = with_delay_cap(60)(handler)
        await conn.js.subscribe(
            "own.x", durable="own", cb=callback, manual_ack=True,
            config=ConsumerConfig(ack_wait=1),
        )  # fmt: skip
        await conn.js.publish("own.x", b"x")
        await asyncio.wait_for(handler.done.wait(), 15)
        names = [info.config.name async for info in _streams(conn)]
        if way == "installed":
            uninstall(conn.nc)  # else nats-py's classes stay patched until it is collected
        await conn.nc.drain()
    assert names == ["OWN"]  # nothing was deferred: no bucket, no park stream
    assert handler.calls[1] - handler.calls[0] < 5  # no blind hold: no bucket, no deadline


async def _streams(conn: Connection) -> AsyncIterator[Any]:
    for info in await conn.js.streams_info():
        yield info
