"""A deadline store that cannot be reached costs one timeout, not one per message, and the
handler never waits for natsmw's bookkeeping (real servers)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
from nats.aio.msg import Msg

import natsmw.delay.stores
from natsmw import publish_not_before, with_delay_cap
from natsmw.delay import DeadlineKey, Deferral, KeyValueDeadlineStore, MemoryDeadlineStore
from natsmw.errors import DeadlineStoreError
from tests.conftest import Connection, Inbox, Stream, flushed
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
