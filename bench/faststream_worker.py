"""What a message costs through natsmw and through FastStream, against raw nats-py in the same
run on the same embedded server. Runs inside the virtual environment that
``python -m bench.faststream_peer`` makes, where FastStream is installed; run that instead.

Every variant drains the same stored messages (128-byte body, 2 headers) through a durable
JetStream push consumer of its own and acks each one:

- raw nats-py: the callback acks;
- natsmw full chain: ``compose(with_size_limit(max_body=1 << 20, max_headers=64),
  with_delay_cap(60))`` around that callback;
- FastStream, ``async def handle(body: bytes)``: its cheapest handler shape, acked by
  FastStream after the handler returns (its default ack policy), with FastDepends as by
  default, and again with ``apply_types=False`` (no FastDepends: the fastest FastStream goes);
- FastStream, ``async def handle(body: str, msg: NatsMessage)``: the shape its documentation
  shows for reaching the message (FastDepends resolves ``msg`` through anyio's thread pool);
- tracing, sampled out by an SDK TracerProvider with ALWAYS_OFF: natsmw's ``with_tracing``
  around the raw callback, and FastStream's ``NatsTelemetryMiddleware`` on the fastest shape.

FastStream brokers run with ``logger=None``: by default FastStream writes two access-log lines
per message, which would measure the logging. A round drains every variant once; the order
rotates from round to round; a first round warms up, counts the calls into anyio's thread pool
per message, and is left out of the figures, which are medians over the other rounds. µs per
message is wall time (the server shares the machine); ``+µs`` is what a variant adds to raw.
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

from bench.common import Handler, Variant, drain_rate, fill, write_report
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

Drain = Callable[[str, str, int], Awaitable[float]]
"""``(server url, durable name, messages)`` -> messages per second."""
Shape = Callable[[Callable[[], None]], Callable[..., Awaitable[None]]]
"""Makes a FastStream handler that calls ``handled()`` for each message."""


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
    variant = Variant(name, prepare)

    async def drain(url: str, durable: str, count: int) -> float:
        return await drain_rate(url, STREAM, SUBJECT, count, variant, durable)

    return Peer(name, drain)


def body_only(handled: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(body: bytes) -> None:
        handled()

    return handle


def documented(handled: Callable[[], None]) -> Callable[..., Awaitable[None]]:
    async def handle(body: str, msg: NatsMessage) -> None:
        handled()

    return handle


def faststream(name: str, shape: Shape, *, apply_types: bool = True, traced: bool = False) -> Peer:
    async def drain(url: str, durable: str, count: int) -> float:
        middlewares = [NatsTelemetryMiddleware(tracer_provider=SAMPLED_OUT)] if traced else []
        broker = NatsBroker(url, logger=None, apply_types=apply_types, middlewares=middlewares)
        rate = await drain_broker(broker, durable, count, shape)
        nc = await nats.connect(url)
        await nc.jetstream().delete_consumer(STREAM, durable)
        await nc.close()
        return rate

    return Peer(name, drain)


async def drain_broker(broker: Any, durable: str, count: int, shape: Shape) -> float:
    """Messages per second for a FastStream ``broker`` to consume and ack ``count`` messages."""
    left = count
    done = asyncio.Event()

    def handled() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            done.set()

    stream = JStream(STREAM, declare=False)
    subscriber = broker.subscriber(SUBJECT, stream=stream, durable=durable, pending_msgs_limit=-1)
    subscriber(shape(handled))
    await broker.connect()  # as in drain_rate, the clock starts with the subscription
    try:
        started = time.perf_counter()
        await broker.start()
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
    finally:
        await broker.stop()
    return count / elapsed


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
    rates: dict[str, float]
    """Median messages per second of each variant."""
    thread_pool_calls: dict[str, float]
    """Calls into anyio's thread pool per message, in the warm-up round."""


async def measure(peers: list[Peer], *, messages: int, rounds: int) -> Figures:
    rates: dict[str, list[float]] = {peer.name: [] for peer in peers}
    thread_pool_calls: dict[str, float] = {}
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
                    thread_pool_calls[peer.name] = calls.count / messages
                    continue
                rates[peer.name].append(await peer.drain(server.url, durable, messages))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return Figures(medians, thread_pool_calls)


def by_variant(figures: Figures) -> dict[str, dict[str, float]]:
    raw = figures.rates[RAW]
    return {
        name: {
            "msg_per_s": rate,
            "x_raw": rate / raw,
            "us_per_msg": 1e6 / rate,
            "us_per_msg_over_raw": 1e6 / rate - 1e6 / raw,
            "thread_pool_calls_per_msg": figures.thread_pool_calls[name],
        }
        for name, rate in figures.rates.items()
    }


def print_table(rows: dict[str, dict[str, float]], *, messages: int, rounds: int) -> None:
    print(
        f"\nFastStream as a peer: {messages} messages, {HEADERS} headers, 128-byte body, "
        f"median of {rounds} rounds after a warm-up"
    )
    print(f"  {'':52s} {'msg/s':>9s} {'x raw':>6s} {'µs/msg':>7s} {'+µs':>7s} {'pool/msg':>8s}")
    for name, row in rows.items():
        print(
            f"  {name:52s} {row['msg_per_s']:9.0f} {row['x_raw']:6.2f} {row['us_per_msg']:7.1f}"
            f" {row['us_per_msg_over_raw']:+7.1f} {row['thread_pool_calls_per_msg']:8.2f}"
        )
    print("\nper message, FastStream against natsmw:")
    for ours, theirs in PAIRS:
        mine, peer = rows[ours], rows[theirs]
        whole = peer["us_per_msg"] / mine["us_per_msg"]
        added = peer["us_per_msg_over_raw"] / mine["us_per_msg_over_raw"]
        print(
            f"  {theirs}: {whole:.1f}x the time of {ours} ({peer['us_per_msg']:.1f} against "
            f"{mine['us_per_msg']:.1f} µs), {added:.1f}x what it adds to raw "
            f"({peer['us_per_msg_over_raw']:+.1f} against {mine['us_per_msg_over_raw']:+.1f} µs)"
        )
    telemetry = rows[TELEMETRY]["us_per_msg"] - rows[FASTEST]["us_per_msg"]
    tracing = rows[TRACING]["us_per_msg_over_raw"]
    print(
        f"  tracing alone, sampled out: FastStream's telemetry adds {telemetry:+.1f} µs to its "
        f"fastest shape, with_tracing {tracing:+.1f} µs to raw ({telemetry / tracing:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after a warm-up")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faststream.json"))
    args = parser.parse_args()
    figures = asyncio.run(measure(PEERS, messages=args.messages, rounds=args.rounds))
    rows = by_variant(figures)
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
