"""Parked messages survive: killed consumer processes, a restarted server, a lost cluster
node, and many processes on one durable. Real servers, real processes, compressed time."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from nats.js.api import ConsumerConfig, StreamConfig

from natsmw import serve_parked, with_delay_cap
from natsmw.delay import PARK_STREAM
from natsmw.delay.park import park_stream
from natsmw.server import NatsCluster, NatsServer
from tests.conftest import Connection, Stream, connect, publish_until_stored, wait_for_consumer
from tests.delay_support import CAP, LegacyHandler, pulling
from tests.test_delay_resilience import (
    all_handled,
    assert_each_called_twice_and_never_early,
    workers,
)


async def test_every_consumer_process_killed_mid_park_a_fresh_one_serves(
    conn: Connection, stream: Stream
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="killed", ack_wait=5))
    url = conn.nc.connected_url.geturl()  # type: ignore[union-attr]
    async with workers() as pool:
        first = await pool.start(url, stream.name, "killed", park=True)
        sequences = [(await conn.js.publish(stream.subject, b"%d" % i)).seq for i in range(3)]
        await pool.wait(lambda events: sum(e["event"] == "deferred" for e in events) >= 3)
        pool.kill(first)  # SIGKILL mid-park: every message parked, none due yet
        await pool.start(url, stream.name, "killed", park=True)
        await pool.wait(all_handled(len(sequences)))

        assert_each_called_twice_and_never_early(pool, sequences)
        assert {e["worker"] for e in pool.calls() if e["calls"] == 2} == {1}
        assert not [e for e in pool.events if e["event"] == "held"]  # parked, not held
    info = await conn.js.consumer_info(stream.name, "killed")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_two_processes_on_one_durable_handle_1000_parked_messages_once_never_early(
    conn: Connection, stream: Stream
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="many", ack_wait=10))
    url = conn.nc.connected_url.geturl()  # type: ignore[union-attr]
    count = 1000
    await park_stream(conn.nc).ensure()  # both processes serve from the start
    async with workers() as pool:
        await pool.start(url, stream.name, "many", delay=3.0, park=True)
        await pool.start(url, stream.name, "many", delay=3.0, park=True)
        sequences = [(await conn.js.publish(stream.subject, b"%d" % i)).seq for i in range(count)]
        await pool.wait(all_handled(count), timeout=90)
        handled = Counter(e["seq"] for e in pool.calls() if e["calls"] == 2)
        deferred = Counter(e["seq"] for e in pool.calls() if e["calls"] == 1)
        assert set(handled) == set(sequences)
        assert set(handled.values()) == {1}  # each due message reached one process, once
        assert set(deferred.values()) == {1}
        for seq in sequences:
            first, second = pool.calls(seq)
            assert float(second["at"]) >= float(first["at"]) + 3.0  # type: ignore[arg-type]
        assert len({e["worker"] for e in pool.calls() if e["calls"] == 2}) == 2  # both served
        assert not [e for e in pool.events if e["event"] == "held"]


async def test_nats_server_restarted_mid_park(own_server: NatsServer) -> None:
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="RESTART", subjects=["restart.>"])
    await conn.js.add_consumer("RESTART", ConsumerConfig(durable_name="r", ack_wait=5))
    legacy = LegacyHandler(delay=3.0)
    cap = with_delay_cap(CAP)
    handle = cap(legacy)
    serving = await serve_parked(conn.js, handle, stream="RESTART", consumer="r")
    async with pulling(conn.js, "restart.x", "r", handle):
        await conn.js.publish("restart.x", b"x")
        await asyncio.wait_for(legacy.deferred.wait(), 5)
        assert cap.stats.parked == 1
        own_server.restart()
        await asyncio.wait_for(conn.reconnected.wait(), 10)
        _, second = await legacy.wait_calls(2, timeout=20)
    await serving.stop()

    assert second.at >= legacy.earliest_allowed
    assert second.handler_calls == 2
    assert len(legacy.calls) == 2
    assert cap.stats.holds == 0
    await conn.nc.close()


async def test_cluster_node_stopped_mid_park(cluster: NatsCluster) -> None:
    conn = await connect(*cluster.urls)
    await conn.js.add_stream(StreamConfig(name="HA", subjects=["ha.>"], num_replicas=3))
    await conn.js.add_consumer("HA", ConsumerConfig(durable_name="ha", ack_wait=5))
    # Long enough that the message is still parked once the cluster has re-elected leaders.
    legacy = LegacyHandler(delay=15.0)
    cap = with_delay_cap(CAP)
    handle = cap(legacy)
    serving = await serve_parked(conn.js, handle, stream="HA", consumer="ha")
    await asyncio.wait_for(serving.ready.wait(), 30)  # a fresh R3 park stream is slow
    async with pulling(conn.js, "ha.x", "ha", handle):
        await publish_until_stored(conn, "ha.x", b"x", msg_id="ha-1")
        await asyncio.wait_for(legacy.deferred.wait(), 10)
        assert cap.stats.parked == 1
        parked_at = time.time()
        connected = cluster.urls.index(f"nats://{conn.nc.connected_url.netloc}")  # type: ignore[union-attr]
        cluster.servers[connected].stop()
        await asyncio.wait_for(conn.reconnected.wait(), 10)
        await wait_for_consumer(conn, "HA", "ha")
        assert time.time() < parked_at + 15.0  # the node went down mid-park
        _, second = await legacy.wait_calls(2, timeout=45)
    await serving.stop()

    assert second.at >= legacy.earliest_allowed
    assert second.handler_calls == 2
    assert len(legacy.calls) == 2
    park = await conn.js.stream_info(PARK_STREAM)
    assert park.config.num_replicas == 3
    await conn.nc.close()
