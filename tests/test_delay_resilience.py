"""Deadlines survive: other processes, process restarts, server restarts, a lost cluster node,
and an unreachable deadline store. Real servers, real processes, compressed time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from natsmw.delay import KeyValueDeadlineStore, with_delay_cap
from natsmw.server import NatsCluster, NatsServer
from tests.conftest import (
    Connection,
    Stream,
    connect,
    publish_until_stored,
    spy_acks,
    wait_for_consumer,
)
from tests.delay_support import (
    CAP,
    DELAY,
    LegacyHandler,
    ScriptedHandler,
    nak_delays,
    pulling,
)

ROOT = Path(__file__).resolve().parent.parent


class Workers:
    """Consumer processes (tests/delay_worker.py) and the events they print."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self._changed = asyncio.Condition()
        self._processes: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(
        self, url: str, stream: str, durable: str, delay: float = DELAY, *, park: bool = False,
        clock_ahead: float = 0.0,
    ) -> int:  # fmt: skip
        arguments = [url, stream, durable, str(CAP), str(delay), *(["park"] if park else [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NATSMW_TEST_CLOCK_AHEAD": str(clock_ahead)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.delay_worker", *arguments,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        index = len(self._processes)
        self._processes.append(process)
        self._readers.append(asyncio.create_task(self._read(index, process)))
        await self.wait(
            lambda events: any(e == {"event": "ready", "worker": index} for e in events)
        )
        return index

    async def _read(self, index: int, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            async with self._changed:
                self.events.append({**json.loads(line), "worker": index})
                self._changed.notify_all()

    async def wait(self, done: object, timeout: float = 20.0) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: done(self.events)), timeout)  # type: ignore[operator]
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out; the workers' events: {self.events}") from None

    def calls(self, seq: int | None = None) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == "call" and seq in (None, e["seq"])]

    def kill(self, index: int) -> None:
        self._processes[index].kill()

    async def close(self) -> None:
        for process in self._processes:
            if process.returncode is None:
                process.kill()
            await process.wait()
        for reader in self._readers:
            reader.cancel()


@asynccontextmanager
async def workers() -> AsyncIterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        await started.close()


def all_handled(count: int) -> object:
    return lambda events: (
        sum(1 for e in events if e["event"] == "call" and e["calls"] == 2) >= count
    )


def assert_each_called_twice_and_never_early(pool: Workers, sequences: list[int]) -> None:
    for seq in sequences:
        calls = pool.calls(seq)
        assert [c["calls"] for c in calls] == [1, 2], calls
        assert float(calls[1]["at"]) >= float(calls[0]["at"]) + DELAY  # type: ignore[arg-type]


async def test_two_consumer_processes_on_one_durable_never_call_early(
    conn: Connection, stream: Stream
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="pool", ack_wait=5))
    url = conn.nc.connected_url.geturl()  # type: ignore[union-attr]
    async with workers() as pool:
        await pool.start(url, stream.name, "pool")
        await pool.start(url, stream.name, "pool")
        sequences = [(await conn.js.publish(stream.subject, b"%d" % i)).seq for i in range(6)]
        await pool.wait(all_handled(len(sequences)))

        assert_each_called_twice_and_never_early(pool, sequences)
        deferred_by = {e["seq"]: e["worker"] for e in pool.events if e["event"] == "deferred"}
        held_elsewhere = [
            e for e in pool.events if e["event"] == "held" and e["worker"] != deferred_by[e["seq"]]
        ]
        assert held_elsewhere  # one process held deadlines the other one recorded


@pytest.mark.parametrize("ahead", [2.0, -2.0])
async def test_an_instance_whose_clock_is_off_never_runs_the_handler_early(
    conn: Connection, stream: Stream, ahead: float
) -> None:
    """One process defers; another, whose wall clock is off by 2 s, takes over. Deadlines are
    compared in the server's time, so neither direction runs the handler early."""
    spy = await spy_acks(conn.nc, stream.name)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="skew", ack_wait=30))
    url = conn.nc.connected_url.geturl()  # type: ignore[union-attr]
    delay = 3.0
    async with workers() as pool:
        # The deferring process is off the other way: the two clocks differ by 4 s.
        await pool.start(url, stream.name, "skew", delay, clock_ahead=-ahead)
        seq = (await conn.js.publish(stream.subject, b"x")).seq
        await spy.wait_for(1)  # its capped nak reached the server: killing it loses nothing
        pool.kill(0)
        await pool.start(url, stream.name, "skew", delay, clock_ahead=ahead)
        await pool.wait(all_handled(1))

        first, second = pool.calls(seq)
        assert float(second["at"]) >= float(first["at"]) + delay  # type: ignore[arg-type]
        assert float(second["at"]) < float(first["at"]) + delay + 1.5  # type: ignore[arg-type]


async def test_consumer_process_restarted_mid_hold(conn: Connection, stream: Stream) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="crash", ack_wait=1))
    url = conn.nc.connected_url.geturl()  # type: ignore[union-attr]
    async with workers() as pool:
        first = await pool.start(url, stream.name, "crash")
        sequences = [(await conn.js.publish(stream.subject, b"%d" % i)).seq for i in range(3)]
        await pool.wait(lambda events: sum(e["event"] == "deferred" for e in events) >= 3)
        pool.kill(first)  # mid-hold: every message deferred, none due yet
        await pool.start(url, stream.name, "crash")
        await pool.wait(all_handled(len(sequences)))

        assert_each_called_twice_and_never_early(pool, sequences)
        assert {e["worker"] for e in pool.calls() if e["calls"] == 2} == {1}
        held_by_new = {e["seq"] for e in pool.events if e["event"] == "held" and e["worker"] == 1}
        assert held_by_new == set(sequences)  # the new process held what the old one deferred


async def test_nats_server_restarted_mid_hold(own_server: NatsServer) -> None:
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="RESTART", subjects=["restart.>"])
    await conn.js.add_consumer("RESTART", ConsumerConfig(durable_name="r", ack_wait=1))
    legacy = LegacyHandler()
    async with pulling(conn.js, "restart.x", "r", with_delay_cap(CAP)(legacy)):
        await conn.js.publish("restart.x", b"x")
        await asyncio.wait_for(legacy.deferred.wait(), 5)

    own_server.restart()
    await asyncio.wait_for(conn.reconnected.wait(), 10)
    fresh = with_delay_cap(CAP)  # an empty cache: the deadline must come from the server
    async with pulling(conn.js, "restart.x", "r", fresh(legacy)):
        _, second = await legacy.wait_calls(2)

    assert second.at >= legacy.earliest_allowed
    assert second.handler_calls == 2
    assert fresh.stats.holds >= 1
    assert len(legacy.calls) == 2
    await conn.nc.close()


async def test_redelivery_early_after_a_server_restart_never_runs_the_handler_early(
    own_server: NatsServer,
) -> None:
    """nats-server keeps nak timers to the second: after a restart a redelivery comes up to a
    second early. With max_deliver=2 the redelivery is the last one: nothing could hold it
    again, so the nak that leads to it must land past the deadline by that margin."""
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="EARLY", subjects=["early.>"])
    await conn.js.add_consumer(
        "EARLY", ConsumerConfig(durable_name="e", ack_wait=30, max_deliver=2)
    )
    legacy = LegacyHandler(delay=2.5)
    cap = with_delay_cap(CAP, parking=False)
    async with pulling(conn.js, "early.x", "e", cap(legacy)):
        await conn.js.publish("early.x", b"x")
        await asyncio.wait_for(legacy.deferred.wait(), 5)
        own_server.restart()
        await asyncio.wait_for(conn.reconnected.wait(), 10)
        _, second = await legacy.wait_calls(2)

    assert second.at >= legacy.earliest_allowed
    assert second.num_delivered == 2
    assert cap.stats.forced_runs == 0
    await conn.nc.close()


async def test_cluster_node_stopped_mid_hold(cluster: NatsCluster) -> None:
    conn = await connect(*cluster.urls)
    await conn.js.add_stream(StreamConfig(name="HA", subjects=["ha.>"], num_replicas=3))
    await conn.js.add_consumer("HA", ConsumerConfig(durable_name="ha", ack_wait=1))
    # Long enough that holds are still due once the cluster has re-elected its leaders (on a
    # loaded 2-core machine that took more than 10 s once).
    legacy = LegacyHandler(delay=20.0)
    async with pulling(conn.js, "ha.x", "ha", with_delay_cap(CAP)(legacy)):
        await publish_until_stored(conn, "ha.x", b"x", msg_id="ha-1")
        await asyncio.wait_for(legacy.deferred.wait(), 10)

    connected = cluster.urls.index(f"nats://{conn.nc.connected_url.netloc}")  # type: ignore[union-attr]
    cluster.servers[connected].stop()
    await asyncio.wait_for(conn.reconnected.wait(), 10)
    await wait_for_consumer(conn, "HA", "ha")
    fresh = with_delay_cap(CAP)
    async with pulling(conn.js, "ha.x", "ha", fresh(legacy)):
        _, second = await legacy.wait_calls(2, timeout=40)

    assert second.at >= legacy.earliest_allowed
    assert second.handler_calls == 2
    assert fresh.stats.holds >= 1  # held from the replicated bucket, with a node down
    assert len(legacy.calls) == 2
    bucket = await conn.js.stream_info("KV_natsmw_deadlines")
    assert bucket.config.num_replicas == 3
    await conn.nc.close()


@pytest.fixture
async def remote_store(
    own_server: NatsServer,
) -> AsyncIterator[tuple[NatsServer, KeyValueDeadlineStore]]:
    """A deadline store on a server of its own, which the test can take away."""
    store_conn = await connect(own_server.url)
    yield own_server, KeyValueDeadlineStore(store_conn.js, timeout=0.3)
    with contextlib.suppress(ConnectionError):  # the test may have left its server stopped
        await store_conn.nc.close()


async def test_unreachable_store_keeps_holding_and_loses_nothing(
    conn: Connection, stream: Stream, remote_store: tuple[NatsServer, KeyValueDeadlineStore]
) -> None:
    store_server, store = remote_store
    spy = await spy_acks(conn.nc, stream.name)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="s", ack_wait=30))
    legacy = LegacyHandler(delay=3.0)
    deferring, fresh = with_delay_cap(CAP, store=store), with_delay_cap(CAP, store=store)
    async with pulling(conn.js, stream.subject, "s", deferring(legacy)):
        ack = await conn.js.publish(stream.subject, b"x")
        await asyncio.wait_for(legacy.deferred.wait(), 5)
        store_server.stop()
        # The instance that deferred holds on from what it knows.
        await spy.wait_for(3)
    assert deferring.stats.holds >= 2

    # An instance that knows nothing cannot tell when the deadline is: it holds blind.
    async with pulling(conn.js, stream.subject, "s", fresh(legacy)):
        await spy.wait_for(len(spy.items) + 2)
        assert fresh.stats.blind_holds >= 1
        assert len(legacy.calls) == 1
        store_server.start()
        _, second = await legacy.wait_calls(2)
        await spy.catch_up(conn.nc)

    assert second.at >= legacy.earliest_allowed
    assert fresh.stats.store_errors >= 1
    assert spy.settlements(ack.seq)[-1] == b"+ACK"


async def test_store_unreachable_when_deferring_sends_the_nak_uncapped(
    conn: Connection, stream: Stream, remote_store: tuple[NatsServer, KeyValueDeadlineStore]
) -> None:
    store_server, store = remote_store
    store_server.stop()
    spy = await spy_acks(conn.nc, stream.name)
    legacy = LegacyHandler(delay=1.0)
    cap = with_delay_cap(CAP, store=store)
    await conn.js.subscribe(stream.subject, durable="u", cb=cap(legacy), manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    _, second = await legacy.wait_calls(2)
    await spy.catch_up(conn.nc)

    assert second.at >= legacy.earliest_allowed
    assert nak_delays(spy.settlements(ack.seq)) == [1.0]  # as the handler asked: safe, uncapped
    assert cap.stats.uncapped == 1
    assert cap.stats.store_errors >= 1


async def test_unreachable_store_never_trusts_a_stale_local_deadline(
    conn: Connection, stream: Stream, remote_store: tuple[NatsServer, KeyValueDeadlineStore]
) -> None:
    """Instance A deferred to T1; B ran the handler at T1, which deferred again to T2.
    With the store gone, A must not take T1 as the deadline: it holds blind instead."""
    store_server, store = remote_store
    spy = await spy_acks(conn.nc, stream.name)
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="ab", ack_wait=30))
    scripted = ScriptedHandler(("nak", 1.0), ("nak", 1.5), ("ack",))
    first, second = with_delay_cap(CAP, store=store), with_delay_cap(CAP, store=store)
    async with pulling(conn.js, stream.subject, "ab", first(scripted)):
        await conn.js.publish(stream.subject, b"x")
        await scripted.wait_settled(1)
    async with pulling(conn.js, stream.subject, "ab", second(scripted)):
        await scripted.wait_settled(2)
    store_server.stop()
    await spy.catch_up(conn.nc)
    settled_before = len(spy.items)
    async with pulling(conn.js, stream.subject, "ab", first(scripted)):
        # Every delivery A sees now is past T1. Its first settlement must be a blind hold
        # (counted before the nak is sent), not a run on the stale deadline.
        await spy.wait_for(settled_before + 1, timeout=10)
        assert len(scripted.calls) == 2
        assert first.stats.blind_holds >= 1
        store_server.start()
        calls = await scripted.wait_calls(3)

    assert calls[2].at >= scripted.naked_at[1] + 1.5
    assert calls[2].handler_calls == 3


async def test_one_cap_on_two_servers_with_the_same_names_keeps_them_apart(
    conn: Connection, own_server: NatsServer
) -> None:
    """The same stream, consumer and sequence on two servers: what the cap remembers of one
    must not hold the other's message (there, max_deliver=3 would lose it)."""
    other = await connect(own_server.url)
    cap = with_delay_cap(CAP)
    first, second = ScriptedHandler(("nak", 60.0)), ScriptedHandler(("ack",))
    for connection, max_deliver in ((conn, -1), (other, 3)):
        await connection.js.add_stream(name="TWIN", subjects=["twin.>"])
        await connection.js.add_consumer(
            "TWIN", ConsumerConfig(durable_name="c", ack_wait=30, max_deliver=max_deliver)
        )
    try:
        async with pulling(conn.js, "twin.x", "c", cap(first)):
            await conn.js.publish("twin.x", b"a")
            await first.wait_settled(1)  # deferred for a minute, remembered by the cap
        async with pulling(other.js, "twin.x", "c", cap(second)):
            await other.js.publish("twin.x", b"b")
            (call,) = await second.wait_calls(1)
        assert call.num_delivered == 1
    finally:
        await conn.js.delete_stream("TWIN")
        await other.nc.close()


async def test_a_recreated_stream_is_not_held_under_the_old_deadline(
    conn: Connection,
) -> None:
    cap = with_delay_cap(CAP)
    old, new = ScriptedHandler(("nak", 60.0)), ScriptedHandler(("ack",))
    for handler, data in ((old, b"old"), (new, b"new")):
        await conn.js.add_stream(name="AGAIN", subjects=["again.>"])
        await conn.js.add_consumer("AGAIN", ConsumerConfig(durable_name="c", ack_wait=30))
        async with pulling(conn.js, "again.x", "c", cap(handler)):
            await conn.js.publish("again.x", data)  # sequence 1, both times
            await handler.wait_settled(1)
        await conn.js.delete_stream("AGAIN")

    assert [c.num_delivered for c in new.calls] == [1]
    assert cap.stats.holds == 0
