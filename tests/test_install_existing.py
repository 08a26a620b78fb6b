"""install() covers what exists already: JetStream contexts and subscriptions made before it."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import timedelta

import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from natsmw import Handler, MessageProxy, Middleware, compose, middleware, with_delay_cap
from natsmw.delay import park
from natsmw.installation import install, uninstall
from natsmw.server import NatsServer
from tests.conftest import Connection, Inbox, Stream, connect

NATS_PY_METHODS = {
    (JetStreamContext, "subscribe"): JetStreamContext.subscribe,
    (JetStreamContext, "pull_subscribe_bind"): JetStreamContext.pull_subscribe_bind,
    (JetStreamContext.PullSubscription, "fetch"): JetStreamContext.PullSubscription.fetch,
    (JetStreamContext.PullSubscription, "unsubscribe"): (
        JetStreamContext.PullSubscription.unsubscribe
    ),
}


def tagging(seen: list[str]) -> Middleware:
    async def step(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg.subject)
        await call_next(msg)

    return middleware(step)


def assert_nats_py_classes_untouched() -> None:
    for (owner, name), function in NATS_PY_METHODS.items():
        assert vars(owner)[name] is function, f"{owner.__qualname__}.{name} is still wrapped"


async def test_a_pull_subscription_made_before_install_gets_the_chain_at_fetch(
    conn: Connection, stream: Stream
) -> None:
    """FastStream's pull subscribers: the context made at connect time, the pull
    subscription made before install, fetch in a loop after it."""
    seen: list[str] = []
    cap = with_delay_cap(1, parking=False)
    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    psub = await conn.js.pull_subscribe(subject=stream.subject, config=config, durable="worker")
    install(conn.nc, chain=compose(tagging(seen), cap))
    await conn.js.publish(stream.subject, b"job")

    (msg,) = await psub.fetch(batch=1, timeout=5)
    await msg.nak(delay=timedelta(hours=3))  # capped, not sent as three hours

    assert isinstance(msg, MessageProxy)
    assert seen == [stream.subject]
    assert cap.stats.capped == 1
    uninstall(conn.nc)
    # The chain stays through uninstall: the hold goes on, nothing runs before the deadline.
    with pytest.raises(asyncio.TimeoutError):
        await psub.fetch(batch=1, timeout=2)
    assert cap.stats.holds >= 1
    assert len(seen) >= 2  # its redeliveries went through the chain, and were held
    await psub.unsubscribe()
    assert_nats_py_classes_untouched()


async def test_a_context_made_before_install_gets_chained_pull_and_push_subscriptions(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    pushed = Inbox()
    install(conn.nc, chain=tagging(seen))
    serving_before = set(park._servings)
    try:
        # conn.js was made at connect time, before install.
        psub = await conn.js.pull_subscribe(stream.subject, durable="pulled")
        await conn.js.subscribe(stream.subject, durable="pushed", cb=pushed.put, manual_ack=True)
        await conn.js.publish(stream.subject, b"job")
        (fetched,) = await psub.fetch(1, timeout=5)
        (delivered,) = await pushed.wait_for(1)

        assert isinstance(fetched, MessageProxy)
        assert isinstance(delivered, MessageProxy)
        assert seen == [stream.subject, stream.subject]
        # The push subscription's parked messages are served, as for a context made after.
        assert {(s.stream, s.consumer) for s in set(park._servings) - serving_before} == {
            (stream.name, "pushed")
        }
        await fetched.ack()
        await delivered.ack()
        await psub.unsubscribe()
    finally:
        uninstall(conn.nc)
    assert_nats_py_classes_untouched()


async def test_callback_subscriptions_made_before_install_keep_the_chain_after_uninstall(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    core, pushed = Inbox(), Inbox()
    core_sub = await conn.nc.subscribe("before.core", cb=core.put)
    push_sub = await conn.js.subscribe(stream.subject, durable="early", cb=pushed.put)
    push_callback = push_sub._sub._cb  # nats-py's auto-ack wrapper of pushed.put
    install(conn.nc, chain=tagging(seen))
    await conn.nc.publish("before.core", b"1")
    await conn.js.publish(stream.subject, b"2")
    (core_during,) = await core.wait_for(1)
    (pushed_during,) = await pushed.wait_for(1)
    uninstall(conn.nc)
    await conn.nc.publish("before.core", b"3")
    await conn.js.publish(stream.subject, b"4")
    core_during, core_after = await core.wait_for(2)
    pushed_during, pushed_after = await pushed.wait_for(2)

    assert isinstance(core_during, MessageProxy)
    assert isinstance(pushed_during, MessageProxy)
    # Kept, as for subscriptions made while installed: a hold may be under way.
    assert isinstance(core_after, MessageProxy)
    assert isinstance(pushed_after, MessageProxy)
    assert seen == ["before.core", stream.subject] * 2
    assert push_sub._sub._cb is not push_callback
    install(conn.nc, chain=tagging(seen))  # not chained a second time
    await conn.nc.publish("before.core", b"5")
    await core.wait_for(3)
    uninstall(conn.nc)
    assert seen == ["before.core", stream.subject] * 2 + ["before.core"]
    await core_sub.unsubscribe()
    assert_nats_py_classes_untouched()


async def test_nothing_is_chained_twice(conn: Connection, stream: Stream) -> None:
    """Contexts made before and after install, subscriptions made while installed and
    reinstalled over: each message goes through one chain, once."""
    first: list[str] = []
    second: list[str] = []
    pushed = Inbox()
    early = await conn.js.pull_subscribe(stream.subject, durable="early")
    install(conn.nc, chain=tagging(first))
    after = conn.nc.jetstream()
    late = await after.pull_subscribe(stream.subject, durable="late")
    await after.subscribe(stream.subject, durable="push", cb=pushed.put)
    await conn.js.publish(stream.subject, b"1")
    (one,) = await early.fetch(1, timeout=5)
    (two,) = await late.fetch(1, timeout=5)
    await pushed.wait_for(1)
    assert first == [stream.subject] * 3
    await one.ack()
    await two.ack()

    uninstall(conn.nc)
    install(conn.nc, chain=tagging(second))  # subscriptions the first reached keep it
    await conn.js.publish(stream.subject, b"2")
    (three,) = await early.fetch(1, timeout=5)  # made before the first install: the first
    (four,) = await late.fetch(1, timeout=5)  # made under the first: the first chain only
    await pushed.wait_for(2)
    uninstall(conn.nc)

    assert first == [stream.subject] * 6
    assert second == []
    await three.ack()
    await four.ack()
    await early.unsubscribe()
    await late.unsubscribe()
    assert_nats_py_classes_untouched()


async def test_a_subscription_read_without_a_callback_is_named_in_a_warning(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.nc.subscribe("read.by.hand")
    await conn.js.pull_subscribe(stream.subject, durable="quiet")  # its inbox is nats-py's
    with caplog.at_level(logging.WARNING, logger="natsmw.install"):
        install(conn.nc, chain=tagging([]))
        await conn.js.subscribe(stream.subject, durable="iterated")
        store = await conn.js.create_object_store("files")
        await store.put("report", b"x" * 10)
        assert await store.get("report")  # nats-py's own subscription inside: not named
    uninstall(conn.nc)
    await conn.js.delete_object_store("files")

    warnings = [r.getMessage() for r in caplog.records if r.name == "natsmw.install"]
    assert len(warnings) == 2
    assert "'read.by.hand'" in warnings[0]
    assert "no callback" in warnings[0]
    assert "cb=" in warnings[0]
    assert "_INBOX." in warnings[1]  # the push subscription's deliver subject


async def test_a_client_dropped_without_uninstall_leaves_nats_py_classes_as_they_were(
    nats_server: NatsServer,
) -> None:
    dropped = await connect(nats_server.url)
    install(dropped.nc, chain=tagging([]))
    assert (
        vars(JetStreamContext)["subscribe"] is not NATS_PY_METHODS[(JetStreamContext, "subscribe")]
    )
    await dropped.nc.close()
    del dropped
    gc.collect()
    assert_nats_py_classes_untouched()
