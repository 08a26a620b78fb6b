"""with_delay_cap on a real nats-server, in compressed time (cap 0.2 s, delays of 2 s)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.api import ConsumerConfig

from natsmw import Handler, MessageProxy, Settlement, compose, middleware, ops
from natsmw.delay import (
    DEADLINE_HEADER,
    DeadlineKey,
    Deferral,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
    handler_calls,
    publish_not_before,
    with_delay_cap,
)
from natsmw.errors import DeadlineStoreError
from natsmw.message import Settle
from tests.conftest import Connection, Inbox, Stream, flushed, spy_acks
from tests.delay_support import (
    CAP,
    DELAY,
    CallLog,
    LegacyHandler,
    ScriptedHandler,
    nak_delays,
    pulling,
    releases_recorded,
    wait_until,
)


@pytest.mark.parametrize("mode", ["push-manual", "push-auto-ack", "pull"])
async def test_handler_not_called_before_deadline_and_called_once_after(
    conn: Connection, stream: Stream, mode: str
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    legacy = LegacyHandler()
    cap = with_delay_cap(CAP)
    capped = cap(legacy)
    if mode == "pull":
        context = pulling(conn.js, stream.subject, "legacy", capped)
    else:
        await conn.js.subscribe(
            stream.subject, durable="legacy", cb=capped, manual_ack=(mode == "push-manual")
        )
        context = None
    ack = await conn.js.publish(stream.subject, b"invoice")
    if context is not None:
        async with context:
            first, second = await legacy.wait_calls(2)
            await spy.catch_up(conn.nc)
    else:
        first, second = await legacy.wait_calls(2)
        await spy.catch_up(conn.nc)

    assert second.at >= legacy.earliest_allowed
    assert second.at < legacy.earliest_allowed + 1.0  # held with short naks, not one long one
    assert (first.handler_calls, second.handler_calls) == (1, 2)
    assert second.num_delivered > 3  # the holds were real redeliveries
    payloads = spy.settlements(ack.seq)
    delays = nak_delays(payloads)
    assert len(delays) == second.num_delivered - 1
    assert max(delays) <= CAP + 0.01
    assert payloads[-1] == b"+ACK"
    assert cap.stats.capped == 1
    assert cap.stats.holds == second.num_delivered - 2
    assert len(legacy.calls) == 2
    assert conn.errors == []


async def test_short_and_plain_naks_go_to_the_server_unchanged(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    store = MemoryDeadlineStore()
    calls = Inbox()

    @with_delay_cap(CAP, store=store)
    async def handler(msg: Msg) -> None:
        await calls.put(msg)
        number = msg.metadata.num_delivered
        if number == 1:
            await msg.nak()
        elif number == 2:
            await msg.nak(delay=CAP)  # exactly the cap: not capped
        else:
            await msg.ack()

    await conn.js.subscribe(stream.subject, durable="short", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    await calls.wait_for(3)
    await spy.catch_up(conn.nc)

    assert spy.settlements(ack.seq) == [b"-NAK", b'-NAK {"delay": 200000000}', b"+ACK"]
    assert await store.get(DeadlineKey(stream.name, "short", ack.seq)) is None


async def test_timedelta_cap_and_timedelta_delay(conn: Connection, stream: Stream) -> None:
    legacy = LegacyHandler(delay=timedelta(seconds=1))
    cap = with_delay_cap(timedelta(milliseconds=200), store=MemoryDeadlineStore())
    await conn.js.subscribe(stream.subject, durable="td", cb=cap(legacy), manual_ack=True)
    await conn.js.publish(stream.subject, b"x")

    _, second = await legacy.wait_calls(2)

    assert second.at >= legacy.earliest_allowed
    assert cap.cap == 0.2
    assert cap.stats.holds >= 3


async def test_max_deliver_three_stretches_the_hold_and_the_message_is_handled(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name="strict", max_deliver=3, ack_wait=30)
    )
    legacy = LegacyHandler()
    cap = with_delay_cap(CAP)
    caplog.set_level(logging.WARNING, logger="natsmw.delay")
    async with pulling(conn.js, stream.subject, "strict", cap(legacy)):
        ack = await conn.js.publish(stream.subject, b"x")
        _, second = await legacy.wait_calls(2)
        await spy.catch_up(conn.nc)

    assert second.at >= legacy.earliest_allowed
    # One nak for the whole delay: the third delivery is kept in reserve, for a redelivery
    # that comes early (after a server restart).
    assert second.num_delivered == 2
    assert second.handler_calls == 2
    delays = nak_delays(spy.settlements(ack.seq))
    assert len(delays) == 1
    assert min(delays) > CAP  # stretched past the cap: survival first
    assert cap.stats.stretched == 1
    assert "stretched" in caplog.text
    assert "max_deliver=3" in caplog.text
    assert spy.settlements(ack.seq)[-1] == b"+ACK"


async def test_publisher_deadline_header_holds_until_not_before(
    conn: Connection, stream: Stream
) -> None:
    calls = Inbox()
    cap = with_delay_cap(CAP, store=MemoryDeadlineStore())

    @cap
    async def handler(msg: Msg) -> None:
        await calls.put(msg)
        assert handler_calls(msg) == 1
        await msg.ack()

    await conn.js.subscribe(stream.subject, durable="hdr", cb=handler, manual_ack=True)
    published_at = time.time()
    await publish_not_before(conn.js, stream.subject, b"remind", not_before=1.0)
    (msg,) = await calls.wait_for(1)
    called_at = time.time()

    assert called_at >= published_at + 1.0
    assert msg.metadata.num_delivered > 3
    assert cap.stats.holds == msg.metadata.num_delivered - 1
    assert DEADLINE_HEADER in (msg.headers or {})


async def test_malformed_deadline_header_is_reported_and_ignored(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Inbox()
    cap = with_delay_cap(CAP, store=MemoryDeadlineStore())

    @cap
    async def handler(msg: Msg) -> None:
        await calls.put(msg)
        await msg.ack()

    await conn.js.subscribe(stream.subject, durable="bad-hdr", cb=handler, manual_ack=True)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        await conn.js.publish(stream.subject, b"x", headers={DEADLINE_HEADER: "next tuesday"})
        (msg,) = await calls.wait_for(1)

    assert msg.metadata.num_delivered == 1
    assert cap.stats.malformed_headers == 1
    assert "'next tuesday'" in caplog.text
    assert conn.errors == []


async def test_core_messages_pass_through_untouched(conn: Connection) -> None:
    store = MemoryDeadlineStore()
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @with_delay_cap(CAP, store=store)
    async def handler(msg: Msg) -> None:
        try:
            await msg.nak(delay=3600)
        except NotJSMessageError as error:
            outcome.set_result(error)
        else:
            outcome.set_result(None)

    await conn.nc.subscribe("core.delay", cb=handler)
    await conn.nc.publish("core.delay", b"x")

    assert isinstance(await asyncio.wait_for(outcome, 5), NotJSMessageError)
    assert store._deferrals == {}


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-5, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("3600", TypeError)],
)
async def test_bad_nak_delay_raises_naming_it_and_the_message_comes_back(
    conn: Connection, stream: Stream, bad: object, error: type[Exception]
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    raised = Inbox()
    failures: list[BaseException] = []

    @with_delay_cap(CAP, store=MemoryDeadlineStore())
    async def handler(msg: Msg) -> None:
        if msg.metadata.num_delivered > 1:
            await raised.put(msg)
            await msg.ack()
            return
        try:
            await msg.nak(delay=bad)
        except Exception as caught:
            failures.append(caught)
            await raised.put(msg)

    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name="bad", ack_wait=0.5, deliver_subject="bad.in")
    )
    config = ConsumerConfig(durable_name="bad", deliver_subject="bad.in")
    await conn.js.subscribe_bind(stream.name, config, "bad", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    _, again = await raised.wait_for(2)  # unsettled, so the server redelivered after ack_wait
    await spy.catch_up(conn.nc)

    assert isinstance(failures[0], error)
    assert repr(bad) in str(failures[0])
    assert again.metadata.num_delivered == 2
    assert spy.settlements(ack.seq) == [b"+ACK"]


@pytest.mark.parametrize(
    ("cap", "error"),
    [(0, ValueError), (-1, ValueError), (math.nan, ValueError), ("60", TypeError),
     (None, TypeError), (timedelta(0), ValueError)],
)  # fmt: skip
def test_bad_cap_fails_at_decoration(cap: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="cap must be"):
        with_delay_cap(cap)  # type: ignore[arg-type]


def test_bad_jitter_fails_at_decoration() -> None:
    with pytest.raises(ValueError, match="jitter"):
        with_delay_cap(1, jitter=1.5)


async def test_another_instance_holds_until_the_deadline_via_the_store(
    conn: Connection, stream: Stream
) -> None:
    """Two consumer instances (two connections, two caches) share one pull durable."""
    from tests.conftest import connect

    other = await connect(conn.nc.connected_url.geturl())  # type: ignore[union-attr]
    legacy = LegacyHandler()
    deferring, holding = with_delay_cap(CAP), with_delay_cap(CAP)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="shared", ack_wait=30))
    # Only the first instance runs while the handler defers; the second takes over afterwards.
    async with pulling(conn.js, stream.subject, "shared", deferring(legacy)):
        await conn.js.publish(stream.subject, b"x")
        await asyncio.wait_for(legacy.deferred.wait(), 5)
    async with pulling(other.js, stream.subject, "shared", holding(legacy)):
        _, second = await legacy.wait_calls(2)

    assert second.at >= legacy.earliest_allowed
    assert second.handler_calls == 2
    assert holding.stats.holds >= 2
    assert len(legacy.calls) == 2
    await other.nc.close()


async def test_compose_with_other_middlewares_keeps_the_cap(
    conn: Connection, stream: Stream
) -> None:
    outer_saw: list[tuple[int, Settlement]] = []

    async def observe(msg: MessageProxy, call_next: Handler) -> None:
        async def record(settlement: Settlement, send: Settle) -> object:
            outer_saw.append((msg.metadata.num_delivered, settlement))
            return await send(settlement)

        with msg.intercept(record):
            await call_next(msg)

    legacy = LegacyHandler()
    cap = with_delay_cap(CAP, store=MemoryDeadlineStore())
    handler = compose(middleware(observe), cap)(legacy)
    await conn.js.subscribe(stream.subject, durable="composed", cb=handler, manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    _, second = await legacy.wait_calls(2)

    assert second.at >= legacy.earliest_allowed
    # The outer middleware sees what reaches the server: the capped nak, each hold, the ack.
    kinds = [s.kind for _, s in outer_saw]
    assert kinds == ["nak"] * (second.num_delivered - 1) + ["ack"]
    assert all(s.delay is not None and s.delay <= CAP + 0.01 for _, s in outer_saw[:-1])


async def test_a_long_nak_made_by_an_inner_middleware_is_capped_too(
    conn: Connection, stream: Stream
) -> None:
    """The cap intercepts naks only: one that an inner middleware makes of the handler's ack
    still reaches it, and is capped."""
    spy = await spy_acks(conn.nc, stream.name)

    async def postpone(msg: MessageProxy, call_next: Handler) -> None:
        async def rewrite(settlement: Settlement, send: Settle) -> object:
            return await send(Settlement("nak", delay=3600))

        with msg.intercept(rewrite, kinds=("ack",)):
            await call_next(msg)

    deliveries = Inbox()
    cap = with_delay_cap(CAP, store=MemoryDeadlineStore())

    @compose(cap, middleware(postpone))
    async def handler(msg: Msg) -> None:
        await deliveries.put(msg)
        await msg.ack()

    await conn.js.subscribe(stream.subject, durable="rewritten", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    (first,) = await deliveries.wait_for(1)
    assert await first.wait_settled(5)
    await spy.catch_up(conn.nc)

    sent = spy.settlements(ack.seq)[0]
    assert sent.startswith(b"-NAK ")
    assert 0 < json.loads(sent[len(b"-NAK ") :])["delay"] <= CAP * 1e9
    assert cap.stats.capped == 1


async def test_holds_on_the_deferring_instance_cost_no_round_trip_per_message(
    conn: Connection, stream: Stream
) -> None:
    """Every request natsmw makes is seen on the wire: none of them is per message held.

    The consumer's limits are read again between two holds (max_deliver may be lowered
    meanwhile), once per consumer for all its held messages; deadlines are never read back.
    """
    requests = Inbox()
    await conn.nc.subscribe("$JS.API.>", cb=requests.put)
    await conn.nc.subscribe("$KV.>", cb=requests.put)
    calls = CallLog()

    async def each_naks_once(msg: Msg) -> None:
        await calls.record(msg)
        await (msg.nak(delay=DELAY) if msg.metadata.num_delivered == 1 else msg.ack())

    cap = with_delay_cap(CAP)
    async with ten_pulled(conn, stream, "cost", cap(each_naks_once)):
        await calls.wait_calls(20)
    await releases_recorded(cap)
    await flushed(conn.nc)

    # The clock probe (a put and a read of its stamp, every few minutes) aside.
    probe = "$KV.natsmw_deadlines.natsmw-clock"

    def made(*prefixes: str) -> int:
        return sum(
            1 for m in requests.items if m.subject.startswith(prefixes) and m.subject != probe
        )

    assert cap.stats.holds >= 80
    # No KV read for a hold: this instance saw every delivery, so nobody else moved a
    # deadline (an operator is read again every RECHECK_HELD, 30 s, not within this test).
    # One KV read per message as it comes due (an operator may have cancelled it since). One
    # KV put per message at the deferral, one when its deadline has passed (for
    # handler_calls), written in the background after a read of the key's revision (a
    # compare-and-set: it must not replace a later deferral). The clock probe's stamp, and
    # the consumer's change marker once, before the first deferral.
    assert made("$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.") <= 1 + 1 + 10 + 10
    assert made("$KV.") == 2 * 10
    # nats-py's pull_subscribe asks for consumer info once; natsmw at most once per round of
    # holds (about one per half cap), whatever the number of messages held.
    rounds = cap.stats.holds / 10
    assert made("$JS.API.CONSUMER.INFO.") <= 1 + 2 * rounds + 2
    assert made("$JS.API.CONSUMER.INFO.") < cap.stats.holds / 3


async def test_handler_calls_counts_every_real_call_across_deferrals(
    conn: Connection, stream: Stream
) -> None:
    scripted = ScriptedHandler(("nak", 1.0), ("nak", None), ("nak", 1.0), ("ack",))
    cap = with_delay_cap(CAP)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="count", ack_wait=30))
    async with pulling(conn.js, stream.subject, "count", cap(scripted)):
        await conn.js.publish(stream.subject, b"x")
        calls = await scripted.wait_calls(4, timeout=15)

    assert [c.handler_calls for c in calls] == [1, 2, 3, 4]
    assert calls[1].at >= scripted.naked_at[0] + 1.0
    assert calls[3].at >= scripted.naked_at[2] + 1.0
    assert calls[3].num_delivered > 6  # holds in between, not counted as calls


async def test_late_consumer_of_a_due_header_counts_calls_from_one(
    conn: Connection, stream: Stream
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="late", ack_wait=30))
    scripted = ScriptedHandler(("nak", None), ("ack",))
    published = time.time()
    await publish_not_before(conn.js, stream.subject, b"x", not_before=0.2)
    await wait_until(published + 0.3)  # the consumer starts after the deadline has passed
    cap = with_delay_cap(CAP)
    async with pulling(conn.js, stream.subject, "late", cap(scripted)):
        calls = await scripted.wait_calls(2)

    assert [(c.num_delivered, c.handler_calls) for c in calls] == [(1, 1), (2, 2)]
    assert cap.stats.holds == 0


async def test_deadline_on_the_last_allowed_delivery_runs_rather_than_lose_it(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="once", max_deliver=1))
    scripted = ScriptedHandler(("ack",))
    cap = with_delay_cap(CAP)
    with caplog.at_level(logging.ERROR, logger="natsmw.delay"):
        async with pulling(conn.js, stream.subject, "once", cap(scripted)):
            await publish_not_before(conn.js, stream.subject, b"x", not_before=60)
            (call,) = await scripted.wait_calls(1)

    assert call.num_delivered == 1
    assert cap.stats.forced_runs == 1
    assert cap.stats.holds == 0
    assert "before its deadline" in caplog.text


async def test_max_deliver_lowered_during_a_hold_is_seen_before_the_last_delivery(
    conn: Connection, stream: Stream
) -> None:
    """Lowered to 9 at delivery 6: the holds must fit the new limit, not the cached one."""
    spy = await spy_acks(conn.nc, stream.name)
    config = ConsumerConfig(durable_name="lowered", ack_wait=30)
    await conn.js.add_consumer(stream.name, config)
    scripted = ScriptedHandler(("nak", 3.0), ("ack",))
    cap = with_delay_cap(CAP, parking=False)
    async with pulling(conn.js, stream.subject, "lowered", cap(scripted)):
        ack = await conn.js.publish(stream.subject, b"x")
        await spy.wait_for(5)  # the handler's nak and four holds: delivery 6 is next
        config.max_deliver = 9
        await conn.js.add_consumer(stream.name, config)  # an update: same name and settings
        calls = await scripted.wait_calls(2)
        await spy.catch_up(conn.nc)

    assert calls[1].at >= scripted.naked_at[0] + 3.0
    assert calls[1].num_delivered <= 9
    assert spy.settlements(ack.seq)[-1] == b"+ACK"
    assert cap.stats.forced_runs == 0


async def test_a_tiny_cap_reads_the_consumer_limits_at_most_ten_times_a_second(
    conn: Connection, stream: Stream
) -> None:
    """Limits are read again once older than half a hold, but not more often than ten times
    a second: a 10 ms cap held for 1.5 s is about 150 holds, not 150 consumer-info requests."""
    requests = Inbox()
    await conn.nc.subscribe("$JS.API.CONSUMER.INFO.>", cb=requests.put)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="tiny", ack_wait=30))
    scripted = ScriptedHandler(("nak", 1.5), ("ack",))
    cap = with_delay_cap(0.01, parking=False)
    async with pulling(conn.js, stream.subject, "tiny", cap(scripted)):
        await conn.js.publish(stream.subject, b"x")
        calls = await scripted.wait_calls(2)
    await flushed(conn.nc)

    assert calls[1].at >= scripted.naked_at[0] + 1.5
    assert cap.stats.holds >= 50  # the holds the requests are counted against
    assert len(requests.items) <= 25, (len(requests.items), cap.stats.holds)


async def test_a_batch_held_at_once_asks_for_consumer_info_once(
    conn: Connection, stream: Stream
) -> None:
    """40 held messages fetched in one batch and handled concurrently: one consumer info
    request in flight for all of them, not one each."""
    requests = Inbox()
    await conn.nc.subscribe("$JS.API.CONSUMER.INFO.>", cb=requests.put)
    calls = CallLog()

    async def each_naks_once(msg: Msg) -> None:
        await calls.record(msg)
        await (msg.nak(delay=DELAY) if msg.metadata.num_delivered == 1 else msg.ack())

    cap = with_delay_cap(CAP, parking=False)
    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name="batch", ack_wait=30, max_ack_pending=100)
    )
    for _ in range(40):
        await conn.js.publish(stream.subject, b"x")
    async with pulling(
        conn.js, stream.subject, "batch", cap(each_naks_once), batch=40, together=True
    ):
        await calls.wait_calls(80)
    await flushed(conn.nc)

    assert cap.stats.holds >= 40
    rounds = cap.stats.holds / 40  # each round of holds may read the limits once
    assert len(requests.items) <= 1 + 2 * rounds + 2, len(requests.items)


async def test_a_decorated_method_handler_is_deferred_like_a_function(
    conn: Connection, stream: Stream
) -> None:
    """``@with_delay_cap`` in a class body: nats-py calls ``consumer.on_msg(msg)``, the
    instance comes along, and the deadline holds."""

    class Consumer:
        def __init__(self) -> None:
            self.calls: list[tuple[float, int]] = []
            self.done = asyncio.Event()

        @with_delay_cap(CAP, parking=False)
        async def on_msg(self, msg: Msg) -> None:
            self.calls.append((time.time(), msg.metadata.num_delivered))
            if len(self.calls) == 1:
                await msg.nak(delay=1.0)
            else:
                await msg.ack()
                self.done.set()

    consumer = Consumer()
    await conn.js.subscribe(stream.subject, durable="method", cb=consumer.on_msg, manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    await asyncio.wait_for(consumer.done.wait(), 10)

    (first, _), (second, delivered) = consumer.calls
    assert second >= first + 1.0
    assert delivered > 2  # held in between, without the method being called


def test_a_cap_too_short_or_a_store_that_is_not_one_is_refused_at_once() -> None:
    for too_short in (1e-9, 0.001):  # 1 ms still made a redelivery loop
        with pytest.raises(ValueError, match=r"at least 0\.01s"):
            with_delay_cap(too_short)
    with pytest.raises(TypeError, match="DeadlineStore"):
        with_delay_cap(1, store="kv")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeadlineStore"):
        with_delay_cap(1, store=MemoryDeadlineStore)  # type: ignore[arg-type]  # the class


async def test_a_nak_on_a_core_request_is_said_once(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A core request has no redelivery: nak() answers the requester '-NAK'. Said once."""

    @with_delay_cap(CAP)
    async def handler(msg: Msg) -> None:
        await msg.nak(delay=5)

    await conn.nc.subscribe("core.requests", cb=handler)
    with caplog.at_level(logging.WARNING, logger="natsmw"):
        for _ in range(2):
            reply = await conn.nc.request("core.requests", b"x", timeout=5)
            assert reply.data.startswith(b"-NAK")
    said = [r for r in caplog.records if "core NATS request" in r.getMessage()]
    assert len(said) == 1
    assert "core.requests" in said[0].getMessage()


async def test_stretched_holds_do_not_flood_the_log(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    """20 messages, each stretched on every hold under max_deliver=4: a line every few
    seconds, the counters count each."""
    config = ConsumerConfig(durable_name="flood", ack_wait=30, max_deliver=4, max_ack_pending=100)
    await conn.js.add_consumer(stream.name, config)
    calls = CallLog()

    async def each_naks_once(msg: Msg) -> None:
        await calls.record(msg)
        await (msg.nak(delay=1.5) if handler_calls(msg) == 1 else msg.ack())

    cap = with_delay_cap(CAP, parking=False)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        handle = cap(each_naks_once)
        async with pulling(conn.js, stream.subject, "flood", handle, batch=20, together=True):
            for _ in range(20):
                await conn.js.publish(stream.subject, b"x")
            await calls.wait_calls(40)

    assert cap.stats.stretched >= 20
    lines = [r for r in caplog.records if "stretched to" in r.getMessage()]
    assert 1 <= len(lines) <= 2, len(lines)


@pytest.mark.parametrize("together", [False, True], ids=["one by one", "concurrently"])
async def test_held_records_are_read_again_only_when_an_operator_changed_their_consumer(
    conn: Connection, stream: Stream, together: bool
) -> None:
    """Every RECHECK_HELD seconds a holding instance looks for operators' changes: one read
    of its consumer's change marker, not one read per held message, and none at the first
    look either (the marker was read before the first deferral). A change (natsmw deferred
    release) moves the marker, and only then is the record read again."""
    requests = Inbox()
    await conn.nc.subscribe("$JS.API.DIRECT.GET.>", cb=requests.put)
    calls = CallLog()

    async def defers_long(msg: Msg) -> None:
        await calls.record(msg)
        await (msg.nak(delay=3600) if handler_calls(msg) == 1 else msg.ack())

    cap = with_delay_cap(0.05, parking=False)
    cap._recheck_held = 0.3
    async with ten_pulled(conn, stream, f"marked{together}", cap(defers_long), together):
        await calls.wait_calls(10)
        await releases_recorded(cap)
        await flushed(conn.nc)
        before = len(requests.items)
        holds = cap.stats.holds
        loop = asyncio.get_running_loop()
        started = loop.time()

        def reads() -> tuple[int, int]:
            subjects = [m.subject for m in requests.items[before:]]
            markers = sum(1 for subject in subjects if "natsmw-changed" in subject)
            return markers, len(subjects) - markers

        while reads()[0] < 5:  # five looks at the marker: five re-read rounds of 0.3 s
            await requests.wait_for(len(requests.items) + 1, timeout=5)
        await flushed(conn.nc)
        marker_reads, record_reads = reads()
        rounds = (loop.time() - started) / 0.3
        assert cap.stats.holds - holds >= 10 * 5  # every message held all along
        assert marker_reads <= rounds + 2  # one per 0.3 s for the consumer
        # Read before the first deferral, the marker answers for all ten from the start.
        assert record_reads == 0

        released = await ops.release(conn.nc, stream.name, f"marked{together}", 1)
        assert released.sequence == 1
        after_release = loop.time()
        await calls.wait_calls(11, timeout=10)  # the marker moved: read, released, run
        # As operate.md says: within RECHECK_HELD plus the cap (here 0.3 + 0.05 s), with a
        # margin for this machine.
        assert loop.time() - after_release <= 0.3 + 0.05 + 1.5


async def test_a_release_whose_record_read_fails_is_read_again_at_the_next_hold(
    conn: Connection, stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker shows an operator's release, but the record's read that follows fails (a
    timeout, here injected once): the release is not forgotten until the old deadline, an
    hour away, but read again at the next hold."""
    calls = CallLog()

    async def defers_long(msg: Msg) -> None:
        await calls.record(msg)
        await (msg.nak(delay=3600) if handler_calls(msg) == 1 else msg.ack())

    real_get = KeyValueDeadlineStore.get
    failed: list[DeadlineKey] = []

    async def fails_once(self: KeyValueDeadlineStore, key: DeadlineKey) -> Deferral | None:
        if key.sequence == 1 and not failed:
            failed.append(key)
            raise DeadlineStoreError("injected: the read timed out")
        return await real_get(self, key)

    cap = with_delay_cap(0.05, parking=False)
    cap._recheck_held = 0.3
    async with ten_pulled(conn, stream, "unread", cap(defers_long)):
        await calls.wait_calls(10)
        await releases_recorded(cap)
        monkeypatch.setattr(KeyValueDeadlineStore, "get", fails_once)
        await ops.release(conn.nc, stream.name, "unread", 1)
        released_at = asyncio.get_running_loop().time()
        await calls.wait_calls(11, timeout=10)
        assert failed
        assert asyncio.get_running_loop().time() - released_at <= 0.3 + 0.05 + 1.5
    assert cap.stats.store_errors == 1


@asynccontextmanager
async def ten_pulled(
    conn: Connection, stream: Stream, durable: str, handler: Handler, together: bool = False
) -> AsyncIterator[None]:
    """Ten messages published to a new durable consumer that ``handler`` pulls ten at a time
    (``together``: all ten stored first, then handled concurrently)."""
    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name=durable, ack_wait=30, max_ack_pending=100)
    )
    for _ in range(10 if together else 0):
        await conn.js.publish(stream.subject, b"x")
    async with pulling(conn.js, stream.subject, durable, handler, batch=10, together=together):
        for _ in range(0 if together else 10):
            await conn.js.publish(stream.subject, b"x")
        yield
