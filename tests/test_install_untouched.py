"""What ``install`` must leave exactly as nats-py does it: each test runs on a plain client
and on one with natsmw installed (lazy headers and a chain), against real servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from natsmw import compose, install, uninstall, with_delay_cap, with_size_limit
from natsmw.server import NatsServer
from tests.conftest import Connection, Inbox, Stream, connect, flushed


@pytest.fixture(params=["plain", "installed"])
async def client(
    request: pytest.FixtureRequest, nats_server: NatsServer
) -> AsyncIterator[Connection]:
    conn = await connect(nats_server.url)
    if request.param == "installed":
        install(conn.nc, chain=compose(with_size_limit(max_body=1 << 20), with_delay_cap(3600)))
    yield conn
    uninstall(conn.nc)
    await conn.nc.drain()


async def test_request_reply_in_both_styles(client: Connection) -> None:
    async def respond(msg: Msg) -> None:
        echo = {"Echo": (msg.headers or {}).get("Ask", "none")}
        await client.nc.publish(msg.reply, msg.data.upper(), headers=echo)

    await client.nc.subscribe("untouched.echo", cb=respond)
    await flushed(client.nc)
    reply = await client.nc.request("untouched.echo", b"ping", timeout=5, headers={"Ask": "1"})
    assert (reply.data, reply.headers) == (b"PING", {"Echo": "1"})
    # nats-py's old style sends no headers with a request (nats-py 2.16), installed or not.
    reply = await client.nc.request("untouched.echo", b"pong", timeout=5, old_style=True)
    assert (reply.data, reply.headers) == (b"PONG", {"Echo": "none"})


async def test_key_value_get_put_and_watch(client: Connection) -> None:
    kv = await client.js.create_key_value(KeyValueConfig(bucket="untouched", history=5))
    watcher = await kv.watchall()
    await kv.put("a", b"1")
    await kv.put("a", b"2")
    await kv.delete("a")
    seen = []
    async for entry in watcher:
        if entry is None:  # the initial values are done
            continue
        seen.append((entry.key, entry.value, entry.operation))
        if len(seen) == 3:
            break
    await watcher.stop()
    assert seen == [("a", b"1", None), ("a", b"2", None), ("a", b"", "DEL")]
    await kv.put("b", b"x")
    assert (await kv.get("b")).value == b"x"
    await client.js.delete_key_value("untouched")


async def test_object_store_of_several_chunks(client: Connection) -> None:
    store = await client.js.create_object_store("untouched")
    body = bytes(range(256)) * 1200  # 300 KB: three chunks
    await store.put("blob", body)
    assert (await store.get("blob")).data == body
    await client.js.delete_object_store("untouched")


async def test_ordered_consumer_with_heartbeats_and_flow_control(
    client: Connection, stream: Stream
) -> None:
    received = Inbox()
    sub = await client.js.subscribe(
        stream.subject, cb=received.put, ordered_consumer=True, idle_heartbeat=0.5,
        flow_control=True,
    )  # fmt: skip
    # Everything the server sends to the consumer's delivery subject, seen by a second
    # subscription of the same client: the heartbeats too.
    wire = Inbox()
    await client.nc.subscribe(sub.subject, cb=wire.put)
    await flushed(client.nc)
    for i in range(200):
        await client.js.publish(stream.subject, b"x" * 2000, headers={"N": str(i)})
    messages = await received.wait_for(200, timeout=20)
    assert [m.headers["N"] for m in messages] == [str(i) for i in range(200)]  # type: ignore[index]

    def idle_heartbeats_after_the_messages() -> int:
        count = 0
        for m in wire.items:
            status = (m.headers or {}).get("Status")
            if status is None:
                count = 0  # a message: count the heartbeats after it
            elif status == "100" and "Idle" in (m.headers or {}).get("Description", ""):
                count += 1
        return count

    while idle_heartbeats_after_the_messages() < 2:
        await wire.wait_for(len(wire.items) + 1, timeout=5)
    await client.nc.flush()  # nats-py has handled them by now, in the same read loop
    assert len(received.items) == 200  # none of them reached the callback


async def test_publish_async_acks(client: Connection, stream: Stream) -> None:
    acks = [await client.js.publish_async(stream.subject, str(i).encode()) for i in range(50)]
    await client.js.publish_async_completed()
    sequences = [(await ack).seq for ack in acks]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == 50


@pytest.mark.parametrize("installed", [False, True], ids=["plain", "installed"])
async def test_headers_in_flight_across_a_reconnect(installed: bool) -> None:
    async with NatsServer() as server:
        conn = await connect(server.url)
        if installed:
            install(conn.nc, chain=compose(with_delay_cap(3600)))
        received = Inbox()
        await conn.nc.subscribe("untouched.reconnect", cb=received.put)
        await flushed(conn.nc)
        await conn.nc.publish("untouched.reconnect", b"before", headers={"Part": "1"})
        await received.wait_for(1)
        await server.arestart()
        await asyncio.wait_for(conn.reconnected.wait(), 15)
        await conn.nc.publish("untouched.reconnect", b"after", headers={"Part": "2"})
        before, after = await received.wait_for(2)
        assert (before.headers, after.headers) == ({"Part": "1"}, {"Part": "2"})
        uninstall(conn.nc)
        await conn.nc.drain()
