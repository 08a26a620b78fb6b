"""Fixtures: real nats-servers started by the suite itself (free ports, temporary stores)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from natsmw.server import NatsCluster, NatsServer

_names = itertools.count()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One server shared by the tests that do not stop it."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server of the test's own, which it may stop and restart."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(3) as started:
        yield started


@dataclass
class Connection:
    """A client connection that records the asynchronous errors nats-py reports."""

    nc: Client
    js: JetStreamContext
    errors: list[BaseException] = field(default_factory=list)
    reconnected: asyncio.Event = field(default_factory=asyncio.Event)


async def connect(*urls: str) -> Connection:
    errors: list[BaseException] = []
    reconnected = asyncio.Event()

    async def record(error: Exception) -> None:
        errors.append(error)

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        servers=list(urls),
        error_cb=record,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
    )
    return Connection(nc, nc.jetstream(), errors, reconnected)


@pytest.fixture
async def conn(nats_server: NatsServer) -> AsyncIterator[Connection]:
    connection = await connect(nats_server.url)
    yield connection
    await connection.nc.drain()


@dataclass(frozen=True)
class Stream:
    name: str
    subject: str  # a literal subject inside the stream

    @property
    def wildcard(self) -> str:
        return self.subject.rsplit(".", 1)[0] + ".>"


@pytest.fixture
async def stream(conn: Connection) -> AsyncIterator[Stream]:
    """A fresh stream with subjects ``<name>.>``; deleted after the test."""
    name = f"T{next(_names)}"
    await conn.js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    yield Stream(name, f"{name.lower()}.work")
    await conn.js.delete_stream(name)


class Inbox:
    """Collects what a callback receives and lets a test wait for it, with a timeout."""

    def __init__(self) -> None:
        self.items: list[Msg] = []
        self._arrived = asyncio.Condition()

    async def put(self, msg: Msg) -> None:
        async with self._arrived:
            self.items.append(msg)
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Msg]:
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.items) >= count), timeout
            )
        return self.items[:count]


_markers = itertools.count()


class AckSpy(Inbox):
    """Every ack, nak and term any client sends for one stream, as the server receives them."""

    def __init__(self, stream: str) -> None:
        super().__init__()
        self.stream = stream

    def settlements(self, stream_sequence: int) -> list[bytes]:
        """The payloads sent for one stream message, in order: b"+ACK", b"-NAK" ..."""
        payloads = []
        for item in self.items:
            tokens = item.subject.split(".")
            if len(tokens) == 9 and int(tokens[5]) == stream_sequence:
                # nats-py's ack() sends an empty payload, which the server reads as +ACK.
                payloads.append(item.data or b"+ACK")
        return payloads

    async def wait_for_settlement(
        self, stream_sequence: int, payload: bytes, timeout: float = 15.0
    ) -> None:
        """Wait until ``payload`` (b"+TERM", b"-NAK"...) was sent for one stream message."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(
                    lambda: any(p.startswith(payload) for p in self.settlements(stream_sequence))
                ),
                timeout,
            )

    async def catch_up(self, nc: Client) -> None:
        """Wait until everything ``nc`` has sent so far has reached the spy.

        The server keeps one connection's messages in order, so once a marker sent now
        arrives, every settlement sent before it has arrived too.
        """
        marker = f"marker {next(_markers)}".encode()
        await nc.publish(f"$JS.ACK.{self.stream}.end-of-test", marker)
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: any(m.data == marker for m in self.items)), 5.0
            )


async def flushed(nc: Client) -> None:
    """Wait until everything ``nc`` has written so far is at the server.

    ``nc.flush()`` alone does not promise that in nats-py 2.16: its PING is written to the
    socket ahead of commands still pending (a SUB, an ack, a publish), so the PONG can come
    back before the server has them. Measured: a SUB flushed that way missed a message
    published right after, 1 run in 40 on a fresh subject.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush()


async def spy_acks(nc: Client, stream: str) -> AckSpy:
    """Subscribe to the ack subjects of ``stream`` on ``nc``."""
    spy = AckSpy(stream)
    await nc.subscribe(f"$JS.ACK.{stream}.>", cb=spy.put)
    await flushed(nc)
    return spy


async def wait_for_consumer(conn: Connection, stream: str, consumer: str) -> None:
    """Wait until a clustered consumer answers again (its leader re-elected after a node
    stopped), asking with a short timeout each time, for at most 20 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        try:
            await conn.js.consumer_info(stream, consumer, timeout=1)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if loop.time() > deadline:
                raise


async def publish_until_stored(
    conn: Connection,
    subject: str,
    data: bytes,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> PubAck:
    """Publish to JetStream, retrying while a clustered stream elects its leader.

    ``msg_id`` (Nats-Msg-Id) keeps a retry of a publish that was in fact stored from
    storing it twice.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    headers = {**(headers or {}), **({"Nats-Msg-Id": msg_id} if msg_id else {})} or None
    while True:
        try:
            return await conn.js.publish(subject, data, timeout=2, headers=headers)
        except (NoStreamResponseError, nats.errors.TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)  # back off between attempts; the deadline bounds the wait


async def add_stream_when_ready(conn: Connection, **config: Any) -> None:
    """Add a stream, retrying while a cluster just started elects its meta leader (under
    load that takes longer than nats-py's 5 s request timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            await conn.js.add_stream(**config)
            return
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)  # back off between attempts; the deadline bounds the wait


class NotifyingExporter(InMemorySpanExporter):
    """Keeps finished spans, and lets a test wait for them."""

    def __init__(self) -> None:
        super().__init__()
        self.exported = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        result = super().export(spans)
        self.exported.set()
        return result

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReadableSpan]:
        """The finished spans, once there are at least ``count``."""
        while len(self.get_finished_spans()) < count:
            self.exported.clear()
            await asyncio.wait_for(self.exported.wait(), timeout)
        return list(self.get_finished_spans())
