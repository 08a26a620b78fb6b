"""The park tier on real nats-servers, in compressed time: long delays wait in the server's
scheduler, off the consumer's ack-pending set, and come back through the same chain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.protocol import command as prot_command

from natsmw import (
    Handler,
    MessageProxy,
    compose,
    handler_calls,
    install,
    middleware,
    serve_parked,
    uninstall,
    with_delay_cap,
)
from natsmw.delay import PARK_STREAM, DueMsg
from natsmw.delay.park import due_consumer_name
from natsmw.server import NatsServer
from tests.conftest import Connection, Stream, connect, flushed
from tests.delay_support import CAP, ScriptedHandler

PARK = 2.0  # a delay that parks (over CAP)


@dataclass(frozen=True)
class Seen:
    at: float
    subject: str
    data: bytes
    headers: dict[str, str] | None
    handler_calls: int
    num_delivered: int
    sequence: int


class Parker:
    """A legacy handler: naks each message for ``delay`` on its first call, acks after."""

    def __init__(
        self,
        delay: float = PARK,
        *,
        naks: int = 1,
        only: bytes | None = None,
        delays: tuple[float, ...] = (),
    ) -> None:
        self.delay = delay
        self.delays = delays  # the nak delay of each call, when given
        self.naks = max(naks, len(delays))
        self.only = only  # defer only the message with this body
        self.seen: list[Seen] = []
        self.asked_at: dict[bytes, float] = {}
        self._changed = asyncio.Condition()

    async def __call__(self, msg: Msg) -> None:
        calls = handler_calls(msg)
        meta = msg.metadata
        seen = Seen(time.time(), msg.subject, msg.data, msg.headers, calls,
                    meta.num_delivered, meta.sequence.stream)  # fmt: skip
        if calls <= self.naks and self.only in (None, msg.data):
            self.asked_at[msg.data] = time.time()
            await msg.nak(delay=self.delays[calls - 1] if self.delays else self.delay)
        else:
            await msg.ack_sync()
        async with self._changed:
            self.seen.append(seen)
            self._changed.notify_all()

    def of(self, data: bytes) -> list[Seen]:
        return [s for s in self.seen if s.data == data]

    async def wait(self, data: bytes, calls: int, timeout: float = 15.0) -> list[Seen]:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.of(data)) >= calls), timeout
            )
        return self.of(data)


async def ack_pending_becomes(
    conn: Connection, stream: str, consumer: str, count: int, timeout: float = 2.0
) -> None:
    """Wait until the consumer's ack-pending count is ``count``, asking the server."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await conn.js.consumer_info(stream, consumer)).num_ack_pending != count:
        assert loop.time() < deadline, f"ack-pending of {consumer} never became {count}"
        await asyncio.sleep(0.01)  # between two questions to the server


async def due_left(conn: Connection, stream: str, consumer: str) -> tuple[int, int]:
    """Due copies of ``stream``/``consumer`` still pending or unacked in the park stream."""
    info = await conn.js.consumer_info(PARK_STREAM, due_consumer_name(stream, consumer))
    return info.num_pending, info.num_ack_pending


@contextlib.asynccontextmanager
async def served(
    conn: Connection, handler: Handler, stream: str, consumer: str
) -> AsyncIterator[None]:
    serving = await serve_parked(conn.js, handler, stream=stream, consumer=consumer)
    try:
        yield
    finally:
        await serving.stop()


async def test_parked_message_leaves_ack_pending_and_runs_once_after_its_deadline(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(only=b"A")
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    await conn.js.subscribe(
        stream.subject, durable="slot", cb=handle, manual_ack=True,
        config=ConsumerConfig(max_ack_pending=1, ack_wait=30),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "slot"):
        await conn.js.publish(stream.subject, b"A", headers={"X-Order": "17"})
        await parker.wait(b"A", 1)
        published_b = time.time()
        await conn.js.publish(stream.subject, b"B")
        (b,) = await parker.wait(b"B", 1)
        # B got the slot at once: A left ack-pending when it was parked.
        assert b.at - published_b < 1.0
        info = await conn.js.consumer_info(stream.name, "slot")
        assert info.num_ack_pending == 0  # A parked, B acked (ack_sync)
        first, second = await parker.wait(b"A", 2)

    assert second.at >= parker.asked_at[b"A"] + PARK
    assert second.at < parker.asked_at[b"A"] + PARK + 1.5
    assert (second.subject, second.data, second.headers) == (
        stream.subject,
        b"A",
        {"X-Order": "17"},
    )
    assert (first.handler_calls, second.handler_calls) == (1, 2)
    assert second.sequence == first.sequence  # the original's stream sequence
    assert len(parker.of(b"A")) == 2
    assert cap.stats.parked == 1
    assert cap.stats.unparked == 1
    assert cap.stats.holds == 0
    info = await conn.js.consumer_info(stream.name, "slot")
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
    assert await due_left(conn, stream.name, "slot") == (0, 0)  # the due copy was acked


async def test_parked_while_the_slot_is_taken_new_work_flows(
    conn: Connection, stream: Stream
) -> None:
    """max_ack_pending=1: A parked for a while, B published after is handled at once, and
    the consumer's ack-pending count is 0 while A is parked."""
    parker = Parker(delay=4.0)
    handle = with_delay_cap(CAP)(parker)
    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name="one", max_ack_pending=1, ack_wait=30)
    )
    psub = await conn.js.pull_subscribe_bind("one", stream.name)

    async def work() -> None:
        while True:
            with contextlib.suppress(nats.errors.TimeoutError):
                for msg in await psub.fetch(1, timeout=0.5):
                    await handle(msg)

    async with served(conn, handle, stream.name, "one"):
        worker = asyncio.create_task(work())
        try:
            await conn.js.publish(stream.subject, b"A")
            await parker.wait(b"A", 1)
            # Parked: the original's ack is on its way; ack-pending drops to 0 and stays.
            await ack_pending_becomes(conn, stream.name, "one", 0)
            parker.naks = 0  # B is handled at once
            published_b = time.time()
            await conn.js.publish(stream.subject, b"B")
            (b,) = await parker.wait(b"B", 1)
            assert b.at - published_b < 1.0
            _first, second = await parker.wait(b"A", 2, timeout=10)
        finally:
            worker.cancel()
            await psub.unsubscribe()  # else nats-py's drain waits on what fetch took
    assert second.at >= parker.asked_at[b"A"] + 4.0
    assert second.handler_calls == 2


async def test_max_deliver_two_a_long_deferral_is_handled_once_after_the_deadline(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=3.0)
    cap = with_delay_cap(CAP)
    install(conn.nc, chain=cap)
    try:
        await conn.nc.jetstream().subscribe(
            stream.subject, durable="twice", cb=parker, manual_ack=True,
            config=ConsumerConfig(max_deliver=2, ack_wait=30),
        )  # fmt: skip
        await conn.js.publish(stream.subject, b"A")
        _first, second = await parker.wait(b"A", 2)
    finally:
        uninstall(conn.nc)
    assert second.at >= parker.asked_at[b"A"] + 3.0
    assert second.handler_calls == 2
    assert second.num_delivered == 2  # the original's one delivery, and the due copy's
    assert cap.stats.holds == 0
    assert cap.stats.parked == 1


async def test_auto_ack_push_subscription_under_install(conn: Connection, stream: Stream) -> None:
    calls: list[tuple[int, float]] = []
    done = asyncio.Event()
    asked: list[float] = []

    async def legacy(msg: Msg) -> None:
        calls.append((handler_calls(msg), time.time()))
        if handler_calls(msg) == 1:
            asked.append(time.time())
            await msg.nak(delay=PARK)
        else:
            done.set()  # returns without settling: nats-py's auto-ack acks the due copy

    install(conn.nc, chain=with_delay_cap(CAP))
    try:
        await conn.nc.jetstream().subscribe(stream.subject, durable="auto", cb=legacy)
        await conn.js.publish(stream.subject, b"x")
        await asyncio.wait_for(done.wait(), 10)
    finally:
        uninstall(conn.nc)
    assert [c for c, _ in calls] == [1, 2]
    assert calls[1][1] >= asked[0] + PARK
    # The due copy was acked by the auto-ack: nothing left to deliver, nothing pending. The
    # auto-ack is sent after the handler returns: flush it before asking.
    await flushed(conn.nc)
    assert await due_left(conn, stream.name, "auto") == (0, 0)


async def test_pull_fetch_under_install_returns_due_messages(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker()
    install(conn.nc, chain=with_delay_cap(CAP))
    try:
        js = conn.nc.jetstream()
        psub = await js.pull_subscribe(stream.subject, durable="pulled")
        await conn.js.publish(stream.subject, b"A", headers={"Nats-Msg-Id": "a-1", "K": "v"})
        deadline = time.time() + 10
        while len(parker.of(b"A")) < 2 and time.time() < deadline:
            with contextlib.suppress(nats.errors.TimeoutError):
                for msg in await psub.fetch(1, timeout=0.5):
                    await parker(msg)
        await psub.unsubscribe()  # else nats-py's drain waits on what fetch took
    finally:
        uninstall(conn.nc)
    _first, second = parker.of(b"A")
    assert second.at >= parker.asked_at[b"A"] + PARK
    assert second.at < parker.asked_at[b"A"] + PARK + 1.5  # returned by the next fetch
    assert second.headers == {"Nats-Msg-Id": "a-1", "K": "v"}
    assert second.handler_calls == 2


async def test_a_due_message_naked_long_again_is_parked_again(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=1.0, naks=2)
    cap = with_delay_cap(CAP)
    install(conn.nc, chain=cap)
    try:
        await conn.nc.jetstream().subscribe(
            stream.subject, durable="again", cb=parker, manual_ack=True
        )
        await conn.js.publish(stream.subject, b"A")
        calls = await parker.wait(b"A", 3)
    finally:
        uninstall(conn.nc)
    assert [c.handler_calls for c in calls] == [1, 2, 3]
    assert calls[2].at >= calls[1].at + 1.0
    assert cap.stats.parked == 2
    assert cap.stats.unparked == 2


async def test_a_lost_ack_after_parking_never_runs_the_handler_early(
    conn: Connection, stream: Stream
) -> None:
    """A crash between storing the schedule and acking the original: the original comes back
    after ack_wait while its schedule waits. It is acked, not handled, and only one due
    message ever comes."""
    parker = Parker(delay=3.0)
    cap = with_delay_cap(CAP)
    dropped: list[int] = []
    originals: list[int] = []  # deliveries of the original, as num_delivered

    async def lose_the_first_ack(msg: MessageProxy, call_next: Handler) -> None:
        if not isinstance(msg.message, DueMsg):
            originals.append(msg.metadata.num_delivered)

        async def swallow(settlement: object, send: object) -> None:
            dropped.append(msg.metadata.num_delivered)  # never reaches the server

        if msg.metadata.num_delivered == 1 and not isinstance(msg.message, DueMsg):
            with msg.intercept(swallow, kinds=("ack", "ack_sync")):
                await call_next(msg)
        else:
            await call_next(msg)

    handle = compose(middleware(lose_the_first_ack), cap)(parker)
    await conn.js.subscribe(
        stream.subject, durable="lost", cb=handle, manual_ack=True,
        config=ConsumerConfig(ack_wait=1.0),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "lost"):
        await conn.js.publish(stream.subject, b"A")
        await parker.wait(b"A", 2)
        info = await conn.js.consumer_info(stream.name, "lost")
    assert dropped == [1]
    calls = parker.of(b"A")
    assert [c.handler_calls for c in calls] == [1, 2]
    assert calls[1].at >= parker.asked_at[b"A"] + 3.0
    assert originals == [1, 2]  # the original came back once, and was acked unhandled
    assert info.num_ack_pending == 0


async def test_decorator_without_serving_holds_and_says_so(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        await conn.js.subscribe(stream.subject, durable="alone", cb=cap(parker), manual_ack=True)
        await conn.js.publish(stream.subject, b"A")
        _first, second = await parker.wait(b"A", 2)
    assert second.at >= parker.asked_at[b"A"] + 1.0
    assert cap.stats.parked == 0
    assert cap.stats.holds >= 3
    assert "held, not parked" in caplog.text


@pytest.fixture
async def alone(own_server: NatsServer) -> AsyncIterator[tuple[Connection, Stream]]:
    """A connection and a stream on a server of the test's own (no park stream yet)."""
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="ALONE", subjects=["alone.>"])
    yield conn, Stream("ALONE", "alone.work")
    await conn.nc.drain()


async def test_a_refused_park_stream_falls_back_to_holds_loudly(
    alone: tuple[Connection, Stream], caplog: pytest.LogCaptureFixture
) -> None:
    """Someone else made natsmw_parked without schedules (as a 2.11 server would read it
    back): natsmw holds, warns and counts, and loses nothing."""
    conn, stream = alone
    await conn.js.add_stream(
        StreamConfig(name=PARK_STREAM, subjects=["natsmw.park.>", "natsmw.due.>"])
    )
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        await conn.js.subscribe(stream.subject, durable="refused", cb=handle, manual_ack=True)
        async with served(conn, handle, stream.name, "refused"):
            await conn.js.publish(stream.subject, b"A")
            _first, second = await parker.wait(b"A", 2)
    assert second.at >= parker.asked_at[b"A"] + 1.0
    assert cap.stats.park_fallbacks == 1
    assert cap.stats.parked == 0
    assert cap.stats.holds >= 3
    assert "held, not parked" in caplog.text
    assert "allow_msg_schedules" in caplog.text


async def test_a_server_too_old_for_schedules_falls_back_to_holds(
    alone: tuple[Connection, Stream], caplog: pytest.LogCaptureFixture
) -> None:
    conn, stream = alone
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    conn.nc._server_info["version"] = "2.11.9"  # what a 2.11 server announces
    with caplog.at_level(logging.WARNING, logger="natsmw.delay"):
        await conn.js.subscribe(stream.subject, durable="old", cb=handle, manual_ack=True)
        async with served(conn, handle, stream.name, "old"):
            await conn.js.publish(stream.subject, b"A")
            await parker.wait(b"A", 2)
    assert cap.stats.park_fallbacks == 1
    assert cap.stats.parked == 0
    assert "2.11.9 has no message schedules" in caplog.text
    with pytest.raises(nats.js.errors.NotFoundError):
        await conn.js.stream_info(PARK_STREAM)  # nothing was created on it


async def test_ephemeral_consumers_are_held_not_parked(conn: Connection, stream: Stream) -> None:
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    install(conn.nc, chain=cap)
    try:
        await conn.nc.jetstream().subscribe(stream.subject, cb=parker, manual_ack=True)  # ephemeral
        await conn.js.publish(stream.subject, b"A")
        await parker.wait(b"A", 2)
    finally:
        uninstall(conn.nc)
    assert cap.stats.parked == 0
    assert cap.stats.holds >= 3


async def test_publisher_deadline_far_ahead_is_parked_on_first_delivery(
    conn: Connection, stream: Stream
) -> None:
    from natsmw import publish_not_before

    seen: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def legacy(msg: Msg) -> None:
        seen.append((time.time(), handler_calls(msg)))
        await msg.ack()
        done.set()

    cap = with_delay_cap(CAP)
    install(conn.nc, chain=cap)
    try:
        await conn.nc.jetstream().subscribe(
            stream.subject, durable="header", cb=legacy, manual_ack=True
        )
        published = time.time()
        await publish_not_before(conn.js, stream.subject, b"x", not_before=PARK)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        uninstall(conn.nc)
    assert seen[0][0] >= published + PARK
    assert seen[0][1] == 1
    assert cap.stats.parked == 1
    assert cap.stats.holds == 0


async def test_publish_not_before_with_a_schedule_subject_uses_the_servers_scheduler(
    conn: Connection,
) -> None:
    from natsmw import publish_not_before

    await conn.js.add_stream(
        StreamConfig(name="SCHED", subjects=["sched.>"], allow_msg_schedules=True)
    )
    try:
        seen: list[tuple[float, int, bool]] = []
        done = asyncio.Event()

        async def legacy(msg: Msg) -> None:  # no natsmw: a plain nats-py consumer
            seen.append(
                (time.time(), msg.metadata.num_delivered, "Nats-Scheduler" in (msg.headers or {}))
            )
            await msg.ack()
            done.set()

        await conn.js.subscribe("sched.out", durable="plain", cb=legacy, manual_ack=True)
        published = time.time()
        await publish_not_before(
            conn.js, "sched.out", b"x", not_before=PARK, schedule_subject="sched.pending.1"
        )
        info = await conn.js.consumer_info("SCHED", "plain")
        assert info.num_pending == 0  # nothing for the consumer until the server publishes it
        await asyncio.wait_for(done.wait(), 10)
        ((at, delivered, scheduled),) = seen
        assert at >= published + PARK - 0.5  # the scheduler ticks every 250 ms
        assert (delivered, scheduled) == (1, True)  # one delivery: no holds, no naks
    finally:
        await conn.js.delete_stream("SCHED")


async def test_publish_not_before_refuses_a_schedule_the_stream_cannot_keep(
    conn: Connection, stream: Stream
) -> None:
    from natsmw import publish_not_before

    with pytest.raises(ValueError, match="does not allow message schedules"):
        await publish_not_before(
            conn.js,
            stream.subject,
            b"x",
            not_before=5,
            schedule_subject=f"{stream.name.lower()}.s.1",
        )
    with pytest.raises(ValueError, match="literal subject other than"):
        await publish_not_before(
            conn.js, stream.subject, b"x", not_before=5, schedule_subject=stream.subject
        )
    assert (await conn.js.stream_info(stream.name)).state.messages == 0  # nothing stored early


async def test_serving_binds_to_a_due_consumer_made_with_another_config(
    conn: Connection, stream: Stream
) -> None:
    """Another instance made natsmw's consumer of due messages when the original consumer's
    ack_wait was different: serving uses it as it is rather than not at all."""
    from natsmw.delay.park import park_stream

    await park_stream(conn.nc).ensure()
    await conn.js.add_consumer(
        PARK_STREAM,
        ConsumerConfig(
            durable_name=due_consumer_name(stream.name, "changed"),
            filter_subject=f"natsmw.due.{stream.name}.changed.>",
            ack_wait=7,
        ),
    )
    parker = Parker(delay=1.0)
    handle = with_delay_cap(CAP)(parker)
    await conn.js.subscribe(
        stream.subject, durable="changed", cb=handle, manual_ack=True,
        config=ConsumerConfig(ack_wait=30),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "changed"):
        await conn.js.publish(stream.subject, b"A")
        _, second = await parker.wait(b"A", 2)
    assert second.handler_calls == 2
    assert second.at >= parker.asked_at[b"A"] + 1.0


async def test_a_due_message_naked_under_park_after_is_held_to_its_new_deadline(
    conn: Connection, stream: Stream
) -> None:
    """The due run asks for a delay between the cap and park_after: that is a hold, and the
    handler does not run again before it is over."""
    parker = Parker(delays=(2.0, 1.0))  # parked, then held (under park_after)
    cap = with_delay_cap(CAP, park_after=1.5)
    install(conn.nc, chain=cap)
    try:
        js = conn.nc.jetstream()
        await js.subscribe(stream.subject, durable="mixed", cb=parker, manual_ack=True)
        await conn.js.publish(stream.subject, b"A")
        calls = await parker.wait(b"A", 3)
        first = calls[0]
    finally:
        uninstall(conn.nc)
    second, third = calls[1], calls[2]
    assert second.at >= first.at + 2.0
    assert third.at >= second.at + 1.0
    assert [c.handler_calls for c in calls] == [1, 2, 3]
    assert cap.stats.parked == 1
    assert cap.stats.unparked == 1  # the held redeliveries of the due copy are not unparks
    assert cap.stats.holds >= 3


async def test_due_messages_come_back_promptly_one_at_a_time(
    conn: Connection, stream: Stream
) -> None:
    """Served one after the other, as nats-py calls a callback, and within a scheduler tick or
    two of their deadlines (not on natsmw's own polling rhythm)."""
    running = 0
    most = 0
    late: list[float] = []
    asked: dict[bytes, float] = {}
    all_back = asyncio.Event()

    async def legacy(msg: Msg) -> None:
        nonlocal running, most
        if handler_calls(msg) == 1:
            asked[msg.data] = time.time() + 1.3
            await msg.nak(delay=1.3)
            return
        running += 1
        most = max(most, running)
        late.append(time.time() - asked[msg.data])
        await asyncio.sleep(0.05)
        running -= 1
        await msg.ack()
        if len(late) == 5:
            all_back.set()

    handle = with_delay_cap(CAP)(legacy)
    await conn.js.subscribe(stream.subject, durable="prompt", cb=handle, manual_ack=True)
    serving = await serve_parked(conn.js, handle, stream=stream.name, consumer="prompt")
    try:
        for i in range(5):
            await conn.js.publish(stream.subject, b"%d" % i)
        await asyncio.wait_for(all_back.wait(), 10)
    finally:
        await serving.stop()
    assert len(late) == 5
    assert most == 1
    assert min(late) >= 0
    assert max(late) < 0.8


async def test_the_due_consumer_keeps_the_originals_max_deliver(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=1.0)
    handle = with_delay_cap(CAP)(parker)
    await conn.js.subscribe(
        stream.subject, durable="bounded", cb=handle, manual_ack=True,
        config=ConsumerConfig(max_deliver=4),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "bounded"):
        await conn.js.publish(stream.subject, b"A")
        await parker.wait(b"A", 2)
    info = await conn.js.consumer_info(PARK_STREAM, due_consumer_name(stream.name, "bounded"))
    assert info.config.max_deliver == 4  # a poison message is not retried without end


async def test_serve_parked_refuses_what_it_could_never_serve(
    conn: Connection, stream: Stream
) -> None:
    handle = with_delay_cap(CAP)(Parker())
    with pytest.raises(ValueError, match="no consumer 'nobody'"):
        await serve_parked(conn.js, handle, stream=stream.name, consumer="nobody")
    sub = await conn.js.subscribe(stream.subject, cb=handle)  # ephemeral
    info = await sub.consumer_info()
    with pytest.raises(ValueError, match="not a durable consumer"):
        await serve_parked(conn.js, handle, stream=stream.name, consumer=info.name)
    with pytest.raises(ValueError, match="concurrency"):
        await serve_parked(conn.js, handle, stream=stream.name, consumer="x", concurrency=0)


async def test_a_new_message_on_a_recreated_stream_is_not_taken_for_a_parked_one(
    alone: tuple[Connection, Stream],
) -> None:
    """A stream deleted and recreated under its name starts its sequences again: a new
    message 1 that comes back (its first delivery was never settled) is handled, not acked
    as if it were the parked message 1 of the old stream."""
    conn, stream = alone
    parker = Parker(delay=4.0, only=b"old")
    handle = with_delay_cap(CAP)(parker)
    config = ConsumerConfig(durable_name="gen", ack_wait=1.0)
    await conn.js.add_consumer(stream.name, config)
    psub = await conn.js.pull_subscribe_bind("gen", stream.name)
    async with served(conn, handle, stream.name, "gen"):
        await conn.js.publish(stream.subject, b"old")
        (old,) = await psub.fetch(1, timeout=2)
        await handle(old)  # parked
        await psub.unsubscribe()
        await conn.js.delete_stream(stream.name)
        await conn.js.add_stream(name=stream.name, subjects=[stream.wildcard])
        await conn.js.add_consumer(stream.name, config)
        psub = await conn.js.pull_subscribe_bind("gen", stream.name)
        ack = await conn.js.publish(stream.subject, b"new")
        assert ack.seq == 1  # the sequence of the parked "old"
        await psub.fetch(1, timeout=2)  # delivered, never settled: back after ack_wait
        (again,) = await psub.fetch(1, timeout=5)
        assert again.metadata.num_delivered == 2
        await handle(again)
        await psub.unsubscribe()
        _, old_again = await parker.wait(b"old", 2)
    (new,) = parker.of(b"new")
    assert new.num_delivered == 2  # handled, not acked as "parked already"
    assert old_again.at >= parker.asked_at[b"old"] + 4.0  # and the parked one still came back


async def test_an_ack_all_consumer_holds_rather_than_ack_earlier_messages(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=1.0, only=b"B")
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    await conn.js.subscribe(
        stream.subject, durable="all", cb=handle, manual_ack=True,
        config=ConsumerConfig(ack_policy=AckPolicy.ALL),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "all"):
        await conn.js.publish(stream.subject, b"B")
        await parker.wait(b"B", 2)
    assert cap.stats.parked == 0
    assert cap.stats.holds >= 3


async def test_a_header_named_status_does_not_hide_a_due_message(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=1.0)
    handle = with_delay_cap(CAP)(parker)
    await conn.js.subscribe(stream.subject, durable="status", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "status"):
        await conn.js.publish(stream.subject, b"A", headers={"Status": "shipped"})
        _, second = await parker.wait(b"A", 2)
    assert second.headers == {"Status": "shipped"}


async def test_a_body_too_big_to_park_is_held_and_the_connection_stays(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    body = b"x" * (conn.nc.max_payload - 200)  # fits as it is; not with natsmw's park headers
    await conn.js.subscribe(stream.subject, durable="big", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "big"):
        await conn.js.publish(stream.subject, body, headers={"K": "v"})
        await parker.wait(body, 2)
    assert cap.stats.park_fallbacks == 1  # said once, when the handler asked
    assert cap.stats.parked == 0
    assert conn.nc.is_connected
    assert conn.errors == []


async def test_drain_under_install_lets_a_due_handler_finish_and_settle(
    nats_server: NatsServer, stream: Stream, conn: Connection
) -> None:
    """A rolling deploy: drain() while a due message is in its handler. The handler finishes,
    its ack reaches the server, and no other instance gets the message again."""
    worker = await connect(nats_server.url)
    started = asyncio.Event()
    finished: list[bool] = []

    async def legacy(msg: Msg) -> None:
        if handler_calls(msg) == 1:
            await msg.nak(delay=1.0)
            return
        started.set()
        await asyncio.sleep(0.5)  # still working when the service shuts down
        await msg.ack()
        finished.append(True)

    install(worker.nc, chain=with_delay_cap(CAP))
    await worker.nc.jetstream().subscribe(
        stream.subject, durable="deploy", cb=legacy, manual_ack=True
    )
    await conn.js.publish(stream.subject, b"A")
    await asyncio.wait_for(started.wait(), 10)
    await worker.nc.drain()

    assert finished == [True]
    assert await due_left(conn, stream.name, "deploy") == (0, 0)  # acked: nobody gets it again


async def test_serving_comes_back_when_its_due_consumer_is_deleted(
    conn: Connection, stream: Stream
) -> None:
    """An operator deletes natsmw's consumer of due messages: serving notices (its pull has
    no responder), makes it again, and what is parked after still comes back."""
    parker = Parker(delay=1.0)
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    await conn.js.subscribe(stream.subject, durable="operator", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "operator"):
        await conn.js.delete_consumer(PARK_STREAM, due_consumer_name(stream.name, "operator"))
        await conn.js.publish(stream.subject, b"A")
        _, second = await parker.wait(b"A", 2)
    assert second.at >= parker.asked_at[b"A"] + 1.0
    assert second.handler_calls == 2
    assert cap.stats.parked == 1  # parked while its serving was broken: and still back


async def test_install_leaves_no_serving_behind_for_ephemeral_or_gone_subscriptions(
    alone: tuple[Connection, Stream],
) -> None:
    """Short-lived subscriptions on a server with no park stream: nothing of natsmw's stays
    around waiting for it (an ordered consumer never parks; an unsubscribed one is gone)."""
    conn, stream = alone
    install(conn.nc, chain=with_delay_cap(CAP))
    try:
        js = conn.nc.jetstream()
        for _ in range(5):
            sub = await js.subscribe(stream.subject, cb=Parker(), ordered_consumer=True)
            await sub.unsubscribe()
        durable = await js.subscribe(stream.subject, durable="short", cb=Parker())
        await durable.unsubscribe()

        def serving() -> list[asyncio.Task[object]]:
            return [t for t in asyncio.all_tasks() if t.get_name().startswith("natsmw serve")]

        left = serving()
        if left:  # each notices within one wait for the stream (10 s)
            await asyncio.wait(left, timeout=15)
        assert serving() == []
    finally:
        uninstall(conn.nc)


async def test_header_names_nats_py_cannot_send_are_parked_and_restored_exactly(
    conn: Connection, stream: Stream
) -> None:
    parker = Parker(only=b"A")
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    await conn.js.subscribe(stream.subject, durable="odd", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "odd"):
        # Another client's publish, with names nats-py refuses to send (BadHeaderError).
        block = b"NATS/1.0\r\nX-Path/Sub: a\r\nX(1): b\r\nNatsmw-Park-K: c\r\nA%41: d\r\n\r\n"
        await conn.nc._send_command(
            prot_command.hpub_cmd(stream.subject, "", block, b"A")  # type: ignore[no-untyped-call]
        )
        first, second = await parker.wait(b"A", 2)

    expected = {"X-Path/Sub": "a", "X(1)": "b", "Natsmw-Park-K": "c", "A%41": "d"}
    assert first.headers == expected
    assert second.headers == expected
    assert (cap.stats.parked, cap.stats.park_fallbacks) == (1, 0)


async def test_a_long_nak_on_the_only_delivery_is_parked_or_said_loudly(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    """max_deliver=1: any nak is the message's last. Parked where it can be; else an error."""
    scripted = ScriptedHandler(("nak", 1.0), ("ack",))
    cap = with_delay_cap(CAP)
    handle = cap(scripted)
    await conn.js.subscribe(
        stream.subject, durable="single", cb=handle, manual_ack=True,
        config=ConsumerConfig(max_deliver=1, ack_wait=30),
    )  # fmt: skip
    async with served(conn, handle, stream.name, "single"):
        await conn.js.publish(stream.subject, b"x")
        calls = await scripted.wait_calls(2)
    assert calls[1].at >= scripted.naked_at[0] + 1.0
    assert (cap.stats.parked, cap.stats.uncapped) == (1, 0)

    unserved = ScriptedHandler(("nak", 1.0))
    lonely = with_delay_cap(CAP)
    await conn.js.subscribe(
        stream.subject, durable="lonely", cb=lonely(unserved), manual_ack=True,
        config=ConsumerConfig(max_deliver=1, ack_wait=30),
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="natsmw.delay"):
        await unserved.wait_settled(1)
    assert lonely.stats.uncapped == 1
    assert "on its last allowed delivery (max_deliver=1)" in caplog.text


async def test_a_consumer_made_again_over_parked_messages_leaves_them_to_their_due_copies(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages parked under a consumer that is then deleted and made again under the same
    name come to the new consumer as first deliveries, stored before it was made: they are
    acked unhandled (said once for the consumer), and their due copies run them once, at
    their deadlines."""
    caplog.set_level(logging.WARNING, logger="natsmw")
    parker = Parker(delay=3.0)
    cap = with_delay_cap(CAP)
    handle = cap(parker)
    sub = await conn.js.subscribe(stream.subject, durable="again", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "again"):
        for body in (b"A", b"B"):  # the first park of a process also writes a record
            await conn.js.publish(stream.subject, body)
            await parker.wait(body, 1)
        assert cap.stats.parked == 2  # the handler's nak returned once each was parked
        await sub.unsubscribe()
        await conn.js.delete_consumer(stream.name, "again")
        await conn.js.subscribe(stream.subject, durable="again", cb=handle, manual_ack=True)
        for body in (b"A", b"B"):
            first, second = await parker.wait(body, 2)
            assert second.at >= first.at + 3.0, f"{body!r} ran early under the new consumer"
        assert await due_left(conn, stream.name, "again") == (0, 0)
        await ack_pending_becomes(conn, stream.name, "again", 0)
    assert [len(parker.of(body)) for body in (b"A", b"B")] == [2, 2]
    said = [r.getMessage() for r in caplog.records if "earlier consumer" in r.getMessage()]
    assert len(said) == 1, said
    assert not [r for r in caplog.records if "parked already" in r.getMessage()]
