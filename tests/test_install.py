"""The zero-code install: a chain in front of every subscription callback of one client."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from natsmw import Handler, MessageProxy, middleware
from natsmw.install import install, installed, uninstall
from tests.conftest import Connection, Inbox, Stream, spy_acks


def tagging(seen: list[str]) -> object:
    async def step(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg.subject)
        await call_next(msg)

    return middleware(step)


async def test_chain_wraps_core_and_jetstream_callbacks_but_not_requests(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    core, pushed = Inbox(), Inbox()
    spy = await spy_acks(conn.nc, stream.name)
    install(conn.nc, chain=tagging(seen))  # type: ignore[arg-type]

    async def legacy_core(msg: Msg) -> None:
        await core.put(msg)
        if msg.reply:
            await msg.respond(b"pong")

    async def legacy_push(msg: Msg) -> None:  # auto-acked by nats-py
        await pushed.put(msg)

    await conn.nc.subscribe("legacy.core", cb=legacy_core)
    await conn.js.subscribe(stream.subject, durable="legacy", cb=legacy_push)
    reply = await conn.nc.request("legacy.core", b"ping", timeout=5)  # nats-py's own inbox
    ack = await conn.js.publish(stream.subject, b"job")
    (job,) = await pushed.wait_for(1)
    await spy.catch_up(conn.nc)

    assert reply.data == b"pong"
    assert seen == ["legacy.core", stream.subject]  # the reply inbox never went through it
    assert isinstance(job, MessageProxy)
    assert spy.settlements(ack.seq) == [b"+ACK"]
    uninstall(conn.nc)


async def test_uninstall_leaves_new_subscriptions_unchained(conn: Connection) -> None:
    seen: list[str] = []
    received = Inbox()
    with installed(conn.nc, chain=tagging(seen)):  # type: ignore[arg-type]
        await conn.nc.subscribe("during", cb=received.put)
    await conn.nc.subscribe("after", cb=received.put)
    await conn.nc.publish("during", b"1")
    await conn.nc.publish("after", b"2")
    during, after = await received.wait_for(2)

    assert seen == ["during"]  # the subscription made while installed keeps its chain
    assert isinstance(during, MessageProxy)
    assert not isinstance(after, MessageProxy)
    assert "subscribe" not in vars(conn.nc)
    await asyncio.wait_for(conn.nc.flush(), 5)
