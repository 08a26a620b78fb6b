"""The delay cap at the edges of a real deployment: buckets made by other tools or lost,
JetStream domains, and chains with two caps. Real servers, compressed time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StreamConfig,
)

import natsmw.delay.cap
import natsmw.delay.clock
import natsmw.delay.limits
import natsmw.delay.stores
from natsmw import (
    Handler,
    compose,
    install,
    publish_not_before,
    uninstall,
    with_delay_cap,
    with_tracing,
)
from natsmw.delay import (
    PARK_STREAM,
    DeadlineKey,
    Deferral,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
)
from natsmw.errors import DeadlineStoreError
from natsmw.server import NatsServer
from tests.conftest import Connection, Inbox, Stream, connect, flushed, spy_acks
from tests.delay_support import CAP, CallLog, pulling


class NaksEachOnce(CallLog):
    """Naks every message for ``delay`` on its first delivery, acks it after."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.runs: dict[int, list[float]] = {}  # stream sequence: when the handler ran

    async def __call__(self, msg: Msg) -> None:
        self.runs.setdefault(msg.metadata.sequence.stream, []).append(time.time())
        await self.record(msg)
        await (msg.nak(delay=self.delay) if msg.metadata.num_delivered == 1 else msg.ack())


@pytest.fixture
async def alone(own_server: NatsServer) -> AsyncIterator[Connection]:
    """A connection to a server of the test's own, whose buckets it may break."""
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="EDGE", subjects=["edge.>"])
    await conn.js.add_consumer("EDGE", ConsumerConfig(durable_name="c", ack_wait=30))
    yield conn
    await conn.nc.close()


async def test_a_bucket_made_without_per_message_ttl_is_refused_once_with_the_fix(
    alone: Connection, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nats kv add natsmw_deadlines` makes a bucket whose stream refuses Nats-TTL. Once it
    is deleted, as the error advises, natsmw makes it right and caps again."""
    # Checked again at every write (30 s apart in production): no test waits for the clock.
    monkeypatch.setattr(natsmw.delay.stores, "_RECHECK", 0.0)
    await alone.js.add_stream(
        StreamConfig(
            name="KV_natsmw_deadlines", subjects=["$KV.natsmw_deadlines.>"],
            allow_rollup_hdrs=True, deny_delete=True, allow_direct=True,
            max_msgs_per_subject=1, discard=DiscardPolicy.NEW,
        )
    )  # fmt: skip
    handler = NaksEachOnce(delay=1.0)
    cap = with_delay_cap(CAP, parking=False)
    with caplog.at_level(logging.ERROR, logger="natsmw.delay"):
        async with pulling(alone.js, "edge.x", "c", cap(handler)):
            for _ in range(3):
                await alone.js.publish("edge.x", b"x")
            calls = await handler.wait_calls(6)

    refusals = [r for r in caplog.records if "allow_msg_ttl" in r.getMessage()]
    assert len(refusals) == 1  # said once, not once per message
    assert "Delete the bucket" in refusals[0].getMessage()
    assert cap.stats.uncapped == 3  # each long nak went to the server whole: none lost
    assert cap.stats.blind_holds == 0  # reading such a bucket works

    await alone.js.delete_stream("KV_natsmw_deadlines")
    async with pulling(alone.js, "edge.x", "c", cap(handler)):
        await alone.js.publish("edge.x", b"x")
        await handler.wait_calls(8)
    assert cap.stats.capped == 1
    assert all(c.handler_calls == 2 for c in calls[3:])


@pytest.mark.parametrize("how", ["missing", "made again", "made again while open"])
async def test_a_deleted_bucket_is_never_a_silent_early_run(
    alone: Connection, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The bucket is deleted while a message is held, and another instance takes over. Its
    deadline is gone: the handler runs, maybe early, but never without a word; where natsmw
    can be sure (a bucket made again after the message, or while it had it open), it counts
    an error."""
    spy = await spy_acks(alone.nc, "EDGE")
    handler = NaksEachOnce(delay=30.0)
    shared = KeyValueDeadlineStore(alone.js) if how == "made again while open" else None
    first = with_delay_cap(CAP, parking=False, store=shared)
    async with pulling(alone.js, "edge.x", "c", first(handler)):
        await alone.js.publish("edge.x", b"x")
        await spy.wait_for(1)  # the capped nak: sent once the deadline was recorded
    await alone.js.delete_key_value("natsmw_deadlines")
    if how != "missing":  # as another instance's next deferral would
        await alone.js.create_key_value(KeyValueConfig(bucket="natsmw_deadlines"))

    taking_over = with_delay_cap(CAP, parking=False, store=shared)
    with caplog.at_level(logging.WARNING, logger="natsmw"):
        async with pulling(alone.js, "edge.x", "c", taking_over(handler)):
            calls = await handler.wait_calls(2)

    assert calls[1].at < calls[0].at + 30  # early: the record is gone, nothing can know
    if how == "missing":
        # Never seen here: a bucket deleted cannot be told from one never made. Said, once.
        assert taking_over.stats.lost_deadlines == 0
        assert "does not exist: if natsmw deferred messages on this server" in caplog.text
        # Reading never makes the bucket: only a deferral does.
        with pytest.raises(Exception, match="not found"):
            await alone.js.stream_info("KV_natsmw_deadlines")
    else:
        assert taking_over.stats.lost_deadlines == 1
        assert "its deadline cannot be known" in caplog.text
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors


async def test_two_caps_in_one_chain_are_refused_when_the_chain_is_built(
    conn: Connection, stream: Stream
) -> None:
    async def handler(msg: Msg) -> None:
        await msg.ack()

    with pytest.raises(ValueError, match="two delay caps"):
        compose(with_delay_cap(1), with_tracing(), with_delay_cap(2))
    with pytest.raises(ValueError, match="two delay caps"):
        compose(with_delay_cap(1), with_tracing())(with_delay_cap(2)(handler))
    with pytest.raises(ValueError, match="two delay caps"):
        with_delay_cap(1)(with_delay_cap(2)(handler))

    install(conn.nc, chain=with_delay_cap(1))
    try:
        with pytest.raises(ValueError, match="two delay caps"):
            await conn.nc.jetstream().subscribe(
                stream.subject, durable="twice", cb=with_delay_cap(2)(handler), manual_ack=True
            )
    finally:
        uninstall(conn.nc)
    consumers = await conn.js.consumers_info(stream.name)
    assert consumers == []  # refused before nats-py made the consumer


async def test_records_are_kept_in_the_messages_domain_or_refused() -> None:
    with NatsServer(domain="hub") as server:
        conn = await connect(server.url)
        try:
            key, deferral = DeadlineKey("S", "c", 1), Deferral(deadline=2e9)
            store = KeyValueDeadlineStore(conn.nc.jetstream(domain="hub"), domain="hub")
            await store.put(key, deferral)
            assert await store.get(key) == deferral
            elsewhere = KeyValueDeadlineStore(conn.nc.jetstream(domain="hub"), domain="leaf")
            with pytest.raises(DeadlineStoreError, match="domain 'hub', not in 'leaf'"):
                await elsewhere.put(key, deferral)
        finally:
            await conn.nc.close()


async def test_a_consumer_made_again_under_the_same_name_keeps_the_deadline(
    alone: Connection,
) -> None:
    """Deleted and made again mid-deferral (to change a setting): delivery counts start at 1
    again, and the deadline recorded under the earlier consumer must still hold."""
    spy = await spy_acks(alone.nc, "EDGE")
    handler = NaksEachOnce(delay=3.0)
    cap = with_delay_cap(CAP, parking=False)
    async with pulling(alone.js, "edge.x", "c", cap(handler)):
        await alone.js.publish("edge.x", b"x")
        await spy.wait_for(3)  # the handler's capped nak, then holds
        await alone.js.delete_consumer("EDGE", "c")
        await alone.js.add_consumer("EDGE", ConsumerConfig(durable_name="c", ack_wait=60))
        calls = await handler.wait_calls(2)

    assert calls[1].at >= calls[0].at + 3.0
    assert calls[1].num_delivered >= 2  # held in the new consumer too
    assert calls[1].handler_calls == 2  # counted across the two consumers
    assert cap.stats.forced_runs == 0


async def test_a_new_consumer_over_a_long_stream_costs_no_round_trip_per_message(
    alone: Connection,
) -> None:
    """Messages stored before their consumer was created are checked for records an earlier
    consumer of the name left: once per consumer, not once per message."""
    for _ in range(200):
        await alone.js.publish("edge.x", b"x")
    await alone.js.add_consumer(
        "EDGE", ConsumerConfig(durable_name="late", ack_wait=30, max_ack_pending=500)
    )
    requests = Inbox()
    await alone.nc.subscribe("$JS.API.>", cb=requests.put)
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    cap = with_delay_cap(CAP)
    slow = 0
    first_of_older = cap._first_of_older

    async def counted(*args: Any) -> Any:
        nonlocal slow
        slow += 1
        return await first_of_older(*args)

    cap._first_of_older = counted  # type: ignore[method-assign]
    async with pulling(alone.js, "edge.x", "late", cap(acks), batch=50):
        await calls.wait_calls(200)
    await flushed(alone.nc)

    asked = [m.subject for m in requests.items if not m.subject.startswith("$JS.API.CONSUMER.MSG")]
    # pull_subscribe's own consumer info, then natsmw: one consumer info (the consumer's
    # creation time) and one look for the deadline bucket, which does not exist. Nothing
    # serves due copies here: nothing parked under an earlier consumer is looked for.
    assert len(asked) <= 4, asked
    assert f"$JS.API.STREAM.INFO.{PARK_STREAM}" not in asked, asked
    # Nor any work per message beyond the hot path, once the records were looked for: the
    # first batch may go the long way while the look is on its way, not the other three.
    assert slow <= 50, slow


async def test_a_publishers_deadline_without_a_bucket_is_not_taken_for_a_lost_one(
    alone: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    cap = with_delay_cap(CAP, parking=False)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        async with pulling(alone.js, "edge.x", "c", cap(acks)):
            published = time.time()
            await publish_not_before(alone.js, "edge.x", b"x", not_before=1.0)
            (call,) = await calls.wait_calls(1)

    assert call.at >= published + 1.0
    assert cap.stats.lost_deadlines == 0
    assert "cannot be known" not in caplog.text


async def test_a_consumer_made_again_under_concurrent_handlers_runs_nothing_early(
    alone: Connection,
) -> None:
    """Batches handled concurrently: deliveries of the new consumer arrive together, their
    sequences out of order. None may slip through on what was known of the old consumer."""
    spy = await spy_acks(alone.nc, "EDGE")
    handler = NaksEachOnce(delay=3.0)
    cap = with_delay_cap(CAP, parking=False)
    handle = cap(handler)
    config = ConsumerConfig(durable_name="many", ack_wait=60, max_ack_pending=1000)
    await alone.js.add_consumer("EDGE", config)
    psub = await alone.js.pull_subscribe_bind("many", "EDGE")

    async def round_of(batch: int) -> None:
        with contextlib.suppress(nats.errors.TimeoutError):
            await asyncio.gather(*(handle(m) for m in await psub.fetch(batch, timeout=0.5)))

    for _ in range(100):
        await alone.js.publish("edge.x", b"x")
    while len(handler.calls) < 100:
        await round_of(100)
    await spy.wait_for(100)
    await alone.js.delete_consumer("EDGE", "many")
    await alone.js.add_consumer("EDGE", config)
    while len(handler.calls) < 200:
        await round_of(100)
    await psub.unsubscribe()

    early = {seq: runs for seq, runs in handler.runs.items() if runs[1] < runs[0] + 3.0}
    assert early == {}
    assert cap.stats.forced_runs == 0


async def test_a_publishers_deadline_on_a_host_whose_clock_runs_ahead_is_kept(
    alone: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's wall clock is 10 s ahead of the server's (and the publisher's): the
    deadline in the header is compared in the server's time, measured before it is read."""
    real = time.time
    monkeypatch.setattr(
        natsmw.delay.clock,
        "time",
        SimpleNamespace(time=lambda: real() + 10.0, monotonic=time.monotonic),
    )
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    cap = with_delay_cap(CAP, parking=False)
    published = real()
    for _ in range(3):
        await publish_not_before(alone.js, "edge.x", b"x", not_before=2.0)
    # Handled together: the ones that come while the clock is measured wait for it.
    async with pulling(alone.js, "edge.x", "c", cap(acks), batch=3, together=True):
        ran = await calls.wait_calls(3)

    assert all(call.at >= published + 2.0 for call in ran)
    assert abs(natsmw.delay.clock.server_clock.offset(alone.nc) - 10.0) < 0.5


async def test_another_instance_notices_a_consumer_made_again_before_it_runs_anything(
    alone: Connection,
) -> None:
    """Two instances on one durable. The consumer is made again; the instance holding a
    message sees none of the new consumer's first sequences (the other one took them), so
    its sequences never go back: the server's advisory must tell it."""
    other = await connect(alone.nc.connected_url.geturl())  # type: ignore[union-attr]
    config = ConsumerConfig(durable_name="two", ack_wait=60, max_ack_pending=1000)
    await alone.js.add_consumer("EDGE", config)
    for _ in range(100):
        await alone.js.publish("edge.x", b"x")
    runs: dict[int, list[float]] = {}

    async def defers_80(msg: Msg) -> None:
        runs.setdefault(msg.metadata.sequence.stream, []).append(time.time())
        if msg.metadata.sequence.stream == 80 and len(runs[80]) == 1:
            await msg.nak(delay=3.0)
        else:
            await msg.ack()

    a, b = with_delay_cap(CAP, parking=False), with_delay_cap(CAP, parking=False)
    first = await other.js.pull_subscribe_bind("two", "EDGE")
    for msg in await first.fetch(100, timeout=5):
        await b(defers_80)(msg)
    await alone.js.delete_consumer("EDGE", "two")
    await alone.js.add_consumer("EDGE", config)
    taken = await alone.js.pull_subscribe_bind("two", "EDGE")
    for msg in await taken.fetch(60, timeout=5):  # the new consumer's sequences 1 to 60
        await a(defers_80)(msg)
    second = await other.js.pull_subscribe_bind("two", "EDGE")
    while len(runs[80]) < 2:
        with contextlib.suppress(nats.errors.TimeoutError):
            for msg in await second.fetch(60, timeout=0.5):
                await b(defers_80)(msg)
    await other.nc.close()

    assert runs[80][1] >= runs[80][0] + 3.0


async def test_a_closed_client_is_not_kept_alive_by_the_delay_cap(
    own_server: NatsServer,
) -> None:
    """A service that reconnects: what the cap knew of the old client goes with it, even when
    the new client only ever sees first deliveries (no deadline store involved)."""
    cap = with_delay_cap(CAP, parking=False)
    deferring = NaksEachOnce(delay=30.0)
    acking = CallLog()

    async def acks(msg: Msg) -> None:
        await acking.record(msg)
        await msg.ack()

    async def one_client(durable: str, handler: Handler, settled: int) -> weakref.ref[object]:
        conn = await connect(own_server.url)
        with contextlib.suppress(Exception):
            await conn.js.add_stream(name="EDGE", subjects=["edge.>"])
        spy = await spy_acks(conn.nc, "EDGE")
        await conn.js.add_consumer(
            "EDGE", ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.NEW)
        )
        async with pulling(conn.js, "edge.x", durable, cap(handler)):
            await conn.js.publish("edge.x", b"x")
            await spy.wait_for(settled)
        await conn.nc.close()
        return weakref.ref(conn.nc)

    first = await one_client("gone", deferring, 2)  # deferred, then held from memory
    second = await one_client("next", acks, 1)  # a first delivery, acked

    async def collected(ref: weakref.ref[object]) -> None:
        while ref() is not None:  # nats-py's own tasks let go of it as they end
            gc.collect()
            await asyncio.sleep(0.01)

    await asyncio.wait_for(collected(first), 5)
    # What the cap remembers belongs to clients still alive (the first one's went with it).
    alive = {id(client) for client in (second(),) if client is not None}
    assert {client for client, _, _ in cap._memory._groups} <= alive
    assert set(cap._stores) <= alive


def test_a_dropped_delay_cap_is_freed_while_its_client_lives() -> None:
    from natsmw.delay.memory import Deliveries

    class Client:
        pass

    client = Client()
    memory = Deliveries()
    memory.seen(DeadlineKey("S", "c", 1), client, None, 1)
    dropped = weakref.ref(memory)
    del memory
    gc.collect()
    assert dropped() is None


async def test_a_clock_that_cannot_be_measured_is_said_once(
    alone: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A store of your own and no park stream: nothing of natsmw's to probe the server's
    clock in. Deadlines are then compared with this host's clock, and that is said, once."""
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    cap = with_delay_cap(CAP, parking=False, store=MemoryDeadlineStore())
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        for _ in range(2):
            await publish_not_before(alone.js, "edge.x", b"x", not_before=0.5)
        async with pulling(alone.js, "edge.x", "c", cap(acks)):
            await calls.wait_calls(2)

    said = [r for r in caplog.records if "cannot measure this host's clock" in r.getMessage()]
    assert len(said) == 1


async def test_a_memory_store_forgets_a_deferral_after_its_deadline() -> None:
    store = MemoryDeadlineStore(keep_after_deadline=1.0)
    gone = time.time() - 10  # a deadline long past, and past its keep too
    for sequence in range(1024):
        await store.put(DeadlineKey("S", "c", sequence), Deferral(deadline=gone))
    assert len(store) == 0  # forgotten on the way (every 1024 puts), not kept forever
    await store.put(DeadlineKey("S", "c", 1), Deferral(deadline=time.time() + 60))
    assert len(store) == 1


async def test_a_clock_reading_goes_with_its_client_even_after_a_failed_probe() -> None:
    """Ids of collected clients are reused: a reading left behind (a failed probe's retry
    time) would pass for a new client's, and that client would never be measured."""
    from natsmw.delay.clock import ServerClock

    class Client:
        pass

    class FailingJetStream:
        async def publish(self, *args: object, **kwargs: object) -> None:
            raise nats.errors.TimeoutError

    clock = ServerClock()
    client = Client()
    await clock.measure(client, FailingJetStream(), "S", "s.clock")  # type: ignore[arg-type]
    assert not clock.stale(client)  # tried a moment ago: tried again later, not on every call
    del client
    gc.collect()
    assert clock._readings == {}


async def test_consumers_that_come_and_go_leave_nothing_behind_for_long(
    conn: Connection, stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived client making ephemeral consumers by the hundred: what the cap keeps per
    consumer (its creation time, its limits) is forgotten once unused, not kept forever."""
    monkeypatch.setattr(natsmw.delay.cap, "_GENERATION_IDLE", 0.0)  # unused at once
    monkeypatch.setattr(natsmw.delay.cap, "_RECHECK_GENERATION", 0.0)
    monkeypatch.setattr(natsmw.delay.limits, "_TTL", 0.0)
    cap = with_delay_cap(CAP, parking=False, store=MemoryDeadlineStore())
    calls = CallLog()

    async def acks(msg: Msg) -> None:
        await calls.record(msg)
        await msg.ack()

    handler = cap(acks)
    await conn.js.publish(stream.subject, b"x")
    consumers = 300
    for _ in range(consumers):
        psub = await conn.js.pull_subscribe(
            stream.subject, config=ConsumerConfig(deliver_policy=DeliverPolicy.LAST)
        )
        (msg,) = await psub.fetch(1, timeout=5)
        await handler(msg)
        await psub.unsubscribe()
    await calls.wait_calls(consumers)
    assert len(cap._generations[id(conn.nc)]) < consumers - 30
    assert len(cap._limits._known[id(conn.nc)]) < consumers - 30


def test_an_outage_is_told_once_every_few_seconds_not_once_per_message(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(natsmw.delay.cap.time, "monotonic", lambda: now[0])
    cap = with_delay_cap(CAP)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        for sequence in range(5):
            cap._unreachable(DeadlineKey("S", "c", sequence), DeadlineStoreError("down"))
        now[0] += 11.0
        cap._unreachable(DeadlineKey("S", "c", 9), DeadlineStoreError("down"))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "and 4 more like it" in said[1]
    assert cap.stats.store_errors == 6


async def test_listing_a_consumer_s_records_skips_keys_natsmw_did_not_write(
    conn: Connection,
) -> None:
    store = KeyValueDeadlineStore(conn.js, bucket="natsmw_listing")
    await store.put(DeadlineKey("LIST", "c", 7), Deferral(deadline=time.time() + 60))
    kv = await conn.js.key_value("natsmw_listing")
    await kv.put("LIST.c.notes", b"put there by someone else")
    assert await store.sequences("LIST", "c") == {7}
