"""What a message costs through natsmw and through FastStream, against raw nats-py in the same
run on the same embedded server. Runs inside the virtual environment that
``python -m bench.faststream_peer`` makes, where FastStream is installed; run that instead.

Every variant drains the same stored messages (128-byte body, 2 headers) through a durable
JetStream push consumer of its own and acks each one:

- raw nats-py: the callback acks;
- natsmw full chain: ``compose(with_size_limit(max_body=1 << 20, max_headers=64),
  with_delay_cap(60))`` around that callback;
- FastStream, ``async def handle(body: bytes)``: the cheapest handler shape we found (an
  untyped body, or ``serializer=None``, measured the same), acked by FastStream after the
  handler returns (its default ack policy), with FastDepends as by default, and again with
  ``apply_types=False`` (no FastDepends: the fastest FastStream goes);
- FastStream, ``async def handle(body: str, msg: NatsMessage)``: the shape its documentation
  shows for reaching the message (FastDepends resolves ``msg`` through anyio's thread pool);
- tracing, sampled out by an SDK TracerProvider with ALWAYS_OFF: natsmw's ``with_tracing``
  around the raw callback, and FastStream's ``NatsTelemetryMiddleware`` on the fastest shape.

FastStream brokers run with ``logger=None``: by default FastStream writes two access-log lines
per message, which would measure the logging. A round drains every variant once; the order
rotates from round to round; a first round warms up, counts the calls into anyio's thread pool
per message, and is left out of the figures, which are medians over the other rounds. ``µs/msg``
is wall time per message (the server shares the machine); ``CPU µs`` is the consumer process's
CPU time per message (all its threads, not the server's), which moves less with the machine's
load; a ``+`` column is what a variant adds to raw. Results go to bench/results/faststream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from bench.common import Handler, fill, write_report
from natsmw import compose, with_delay_cap, with_size_limit, with_tracing
from natsmw.server import NatsServer

try:
    import anyio.to_thread  # type: ignore[import-not-found]
    from faststream.nats import JStream, NatsBroker, NatsMessage  # type: ignore[import-not-found]
    from faststream.nats.opentelemetry import (  # type: ignore[import-not-found]
        NatsTelemetryMiddleware,
    )
except ImportError as missing:
    raise SystemExit(
        f"bench.faststream_worker runs where FastStream is installed ({missing}); "
        "run python -m bench.faststream_peer, which installs it in an environment of its own"
    ) from None

STREAM, SUBJECT, HEADERS = "BENCH", "bench.msgs", 2
SAMPLED_OUT = TracerProvider(sampler=ALWAYS_OFF)

# FastStream warns that a durable push consumer does not scale out; raw nats-py drains through
# the same kind of consumer, which is the point of the comparison.
warnings.filterwarnings(
    "ignore", "The JetStream Push consumer with the `durable` option", RuntimeWarning
)


@dataclass
class Drained:
    """One drain of every message: wall seconds, and CPU seconds of this process's threads."""

    seconds: float
    cpu_seconds: float


class Stopwatch:
    """Wall and CPU time from its making to :meth:`read`."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> Drained:
        return Drained(time.perf_counter() - self.wall, time.process_time() - self.cpu)


class Countdown:
    """``done`` is set once :meth:`handled` has been called ``count`` times."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.done = asyncio.Event()

    def handled(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


Drain = Callable[[str, str, int], Awaitable[Drained]]
"""``(server url, durable name, messages)``: drain them all through a new durable consumer."""
Shape = Callable[[Callable[[], None]], Callable[..., Awaitable[None]]]
"""Makes a FastStream handler that calls the given ``handled()`` for each message."""


@dataclass
class Peer:
    name: str
    drain: Drain


async def ack(msg: Msg) -> None:
    await msg.ack()


def full_chain(nc: Client) -> Handler:
    return compose(with_size_limit(max_body=1 << 20, max_headers=64), with_delay_cap(60))(ack)


def sampled_out_tracing(nc: Client) -> Handler:
    return with_tracing(tracer_provider=SAMPLED_OUT)(ack)


def nats_py(name: str, prepare: Callable[[Client], Handler]) -> Peer:
    async def drain(url: str, durable: str, count: int) -> Drained:
        nc = await nats.connect(url)
        try:
            drained = await drain_subscription(nc, durable, count, prepare(nc))
        finally:
            await nc.close()
        await delete_consumer(url, durable)
        return drained

    return Peer(name, drain)


async def drain_subscription(nc: Client, durable: str, count: int, handler: Handler) -> Drained:
    """``count`` messages through ``handler`` on a push subscription, as bench.common does."""
    countdown = Countdown(count)

    async def counted(msg: Msg) -> None:
        await handler(msg)
        countdown.handled()

    stopwatch = Stopwatch()
    sub = await nc.jetstream().subscribe(
        SUBJECT, durable=durable, cb=counted, manual_ack=True, pending_msgs_limit=-1
    )
    await asyncio.wait_for(countdown.done.wait(), 600)
    drained = stopwatch.read()
    await sub.unsubscribe()
    return drained


def body_only(handled: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(body: bytes) -> None:
        handled()

    return handle


def documented(handled: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(body: str, msg: NatsMessage) -> None:
        handled()

    return handle


def faststream(name: str, shape: Shape, *, apply_types: bool = True, traced: bool = False) -> Peer:
    async def drain(url: str, durable: str, count: int) -> Drained:
        middlewares = [NatsTelemetryMiddleware(tracer_provider=SAMPLED_OUT)] if traced else []
        broker = NatsBroker(url, logger=None, apply_types=apply_types, middlewares=middlewares)
        drained = await drain_broker(broker, durable, count, shape)
        await delete_consumer(url, durable)
        return drained

    return Peer(name, drain)


async def drain_broker(broker: Any, durable: str, count: int, shape: Shape) -> Drained:
    """``count`` messages through a handler of ``shape`` subscribed on a FastStream broker."""
    countdown = Countdown(count)
    stream = JStream(STREAM, declare=False)
    subscriber = broker.subscriber(SUBJECT, stream=stream, durable=durable, pending_msgs_limit=-1)
    subscriber(shape(countdown.handled))
    await broker.connect()  # connected first: the clock starts with the subscription, as above
    try:
        stopwatch = Stopwatch()
        await broker.start()
        await asyncio.wait_for(countdown.done.wait(), 600)
        return stopwatch.read()
    finally:
        await broker.stop()


async def delete_consumer(url: str, durable: str) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().delete_consumer(STREAM, durable)
    await nc.close()


RAW = "raw nats-py"
CHAIN = "natsmw full chain (guard + cap)"
BYTES = "FastStream, body: bytes"
FASTEST = "FastStream, body: bytes, apply_types=False"
DOCUMENTED = "FastStream, body: str + msg: NatsMessage"
TRACING = "natsmw with_tracing, sampled out"
TELEMETRY = "FastStream telemetry, apply_types=False, sampled out"

PEERS = [
    nats_py(RAW, lambda nc: ack),
    nats_py(CHAIN, full_chain),
    faststream(BYTES, body_only),
    faststream(FASTEST, body_only, apply_types=False),
    faststream(DOCUMENTED, documented),
    nats_py(TRACING, sampled_out_tracing),
    faststream(TELEMETRY, body_only, apply_types=False, traced=True),
]
# (natsmw, FastStream) pairs the summary compares per message.
PAIRS = [(CHAIN, BYTES), (CHAIN, FASTEST), (CHAIN, DOCUMENTED), (TRACING, TELEMETRY)]


class ThreadPoolCalls:
    """Counts calls into anyio's thread pool (``anyio.to_thread.run_sync``) while in use."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        run_sync = anyio.to_thread.run_sync

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await run_sync(*args, **kwargs)

        anyio.to_thread.run_sync = counted
        try:
            yield
        finally:
            anyio.to_thread.run_sync = run_sync


@dataclass
class Figures:
    """Per variant: the drains of the measured rounds, and thread-pool calls per message."""

    drains: dict[str, list[Drained]]
    thread_pool_calls: dict[str, float]


async def measure(peers: list[Peer], *, messages: int, rounds: int) -> Figures:
    """Drain every peer once a round, in an order that rotates; round 0 warms up."""
    figures = Figures({peer.name: [] for peer in peers}, {})
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        await fill(nc, STREAM, SUBJECT, messages, HEADERS)
        await nc.close()
        for round_ in range(rounds + 1):
            turn = round_ % len(peers)
            for index, peer in enumerate(peers[turn:] + peers[:turn]):
                durable = f"r{round_}x{index}"
                if round_ == 0:
                    calls = ThreadPoolCalls()
                    with calls.counting():
                        await peer.drain(server.url, durable, messages)
                    figures.thread_pool_calls[peer.name] = calls.count / messages
                    continue
                figures.drains[peer.name].append(await peer.drain(server.url, durable, messages))
    return figures


def by_variant(figures: Figures, messages: int) -> dict[str, dict[str, float]]:
    """The report's rows: medians over the rounds, per message, and against raw."""
    rows: dict[str, dict[str, float]] = {}
    for name, drains in figures.drains.items():
        rate = statistics.median(messages / drained.seconds for drained in drains)
        cpu = statistics.median(drained.cpu_seconds * 1e6 / messages for drained in drains)
        rows[name] = {"msg_per_s": rate, "us_per_msg": 1e6 / rate, "cpu_us_per_msg": cpu}
    raw = rows[RAW]
    for row in rows.values():
        row["x_raw"] = row["msg_per_s"] / raw["msg_per_s"]
        row["us_per_msg_over_raw"] = row["us_per_msg"] - raw["us_per_msg"]
        row["cpu_us_per_msg_over_raw"] = row["cpu_us_per_msg"] - raw["cpu_us_per_msg"]
    for name, calls in figures.thread_pool_calls.items():
        rows[name]["thread_pool_calls_per_msg"] = calls
    return rows


COLUMNS = {  # heading, key, format
    "msg/s": ("msg_per_s", "9.0f"),
    "x raw": ("x_raw", "6.2f"),
    "µs/msg": ("us_per_msg", "7.1f"),
    "+µs": ("us_per_msg_over_raw", "+7.1f"),
    "CPU µs": ("cpu_us_per_msg", "7.1f"),
    "+CPU µs": ("cpu_us_per_msg_over_raw", "+8.1f"),
    "pool/msg": ("thread_pool_calls_per_msg", "8.2f"),
}


def print_table(rows: dict[str, dict[str, float]], *, messages: int, rounds: int) -> None:
    print(
        f"\nFastStream as a peer: {messages} messages, {HEADERS} headers, 128-byte body, "
        f"median of {rounds} rounds after a warm-up"
    )
    widths = [len(format(0.0, spec)) for _, spec in COLUMNS.values()]
    print(f"  {'':52s}", *(f"{head:>{w}s}" for head, w in zip(COLUMNS, widths, strict=True)))
    for name, row in rows.items():
        print(f"  {name:52s}", *(format(row[key], spec) for key, spec in COLUMNS.values()))
    print("\nper message, FastStream / natsmw: whole, and what each adds to raw")
    raw = rows[RAW]
    for ours, theirs in PAIRS:
        print(f"  {theirs} / {ours}", *compared(rows[theirs], rows[ours], raw), sep="\n    ")
    # FastStream's telemetry alone: what it adds to its fastest shape, as if added to raw.
    telemetry = {key: rows[TELEMETRY][key] - rows[FASTEST][key] + raw[key] for key in raw}
    alone = compared(telemetry, rows[TRACING], raw)
    print("  tracing alone: FastStream's telemetry / with_tracing", *alone, sep="\n    ")


def compared(theirs: dict[str, float], ours: dict[str, float], raw: dict[str, float]) -> list[str]:
    """Their wall time and CPU per message over ours: whole, and what each adds to raw."""
    lines = []
    for what, key in (("wall", "us_per_msg"), ("CPU ", "cpu_us_per_msg")):
        their_part, our_part = theirs[key] - raw[key], ours[key] - raw[key]
        lines.append(
            f"{what} {theirs[key] / ours[key]:4.1f}x ({theirs[key]:6.1f} / {ours[key]:5.1f} µs),"
            f" added {their_part / our_part:4.1f}x ({their_part:+6.1f} / {our_part:+5.1f} µs)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after a warm-up")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faststream.json"))
    args = parser.parse_args()
    figures = asyncio.run(measure(PEERS, messages=args.messages, rounds=args.rounds))
    rows = by_variant(figures, args.messages)
    print_table(rows, messages=args.messages, rounds=args.rounds)
    peers = {name: metadata.version(name) for name in ("faststream", "fast-depends", "pydantic")}
    write_report(
        args.out,
        "FastStream as a peer: push consume + ack",
        rows,
        unit="by_variant",
        messages=args.messages,
        rounds=args.rounds,
        headers=HEADERS,
        body_bytes=128,
        peer_versions=peers,
    )


if __name__ == "__main__":
    main()
