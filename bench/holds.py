"""The hold path: the consumer's CPU per delivery and deliveries per second, holds against
raw naks, in one run.

    python -m bench.holds [--messages 2000] [--seconds 5] [--rounds 3] [--limits-age S]

Raw: a consumer whose handler naks every delivery with the same short delay natsmw holds
with (``nak(delay=CAP)``), so that both go through the server's redelivery timer. Held: the
same consumer wrapped in with_delay_cap, every message deferred by an hour, held with a cap
short enough that the rate is the client's, not the cap's. The floor: the least a hold can
cost in Python, written by hand for this bench (a dict of deadlines in memory, nothing kept
across restarts or instances, no max_deliver). Also held: on another instance
(another connection and delay cap, nothing cached: a new one each window), and with the
cap's memory limited to a half and a tenth of the messages held (2x and 10x past its limit),
and held under ``with_tracing`` with every span sampled: its CPU, and the spans per hold.

Every variant gets the same windows: a warm-up round that is not counted (it is also where
the messages are first deferred), then ``rounds`` rounds. In each round raw and held take
turns (raw, held, raw, held, ... over the run), then the other variants follow in an order
that rotates from round to round. Figures are medians over the rounds, with their range; a
ratio compares a window with the raw window of its own round.

CPU is the consumer thread's CPU time per delivery (``time.thread_time``): every client runs
in that thread, while the requests natsmw makes are counted on the wire by a connection in a
thread of its own, which costs the consumer nothing. A window ends by pausing its consumer
and draining its subscription, so that no delivery is left to ``ack_wait``.

The cap reads the consumer's limits (``max_deliver``) again when its reading is older than
about half the cap, and at most ten times a second: under this bench's 1 ms cap, ten
consumer-info requests a second per consumer; they show in "server requests per hold".
``--limits-age 13.5`` trusts a reading as long as a 30 s cap does, to see holds without them.
Results go to bench/results/holds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from bench.common import Handler, hand_written_hold, rotated, write_report
from natsmw import compose, with_delay_cap, with_tracing
from natsmw.delay import DelayCap
from natsmw.delay.memory import Deliveries
from natsmw.server import NatsServer

CAP = 0.01  # the shortest cap natsmw takes: the client, not the delay, sets the rate
READS = ("$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.")  # a deadline read from the bucket
REQUESTS = ("$JS.API.CONSUMER.INFO.", *READS, "$KV.")  # every request natsmw makes
RAW = "raw nak"
FLOOR = "hand-written hold (the floor)"
TRACED = "held, traced (SDK, every span sampled)"


class CountingSpans(SpanProcessor):
    """Counts the spans ended, and drops them (the cost of tracing, not of an exporter)."""

    def __init__(self) -> None:
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


SPANS = CountingSpans()
PAUSED_UNTIL = "2999-01-01T00:00:00Z"  # between a consumer's windows: resumed by the next one


class Wire:
    """Counts natsmw's requests to the server, on a connection and in a thread of their own:
    the consumer's thread, whose CPU time is measured, does none of the counting.

        with Wire(url) as wire:
            before = wire.requests
    """

    def __init__(self, url: str) -> None:
        self.requests = 0
        self.reads = 0
        self._url = url
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    def __enter__(self) -> Wire:
        self._thread.start()
        if not self._listening.wait(30):
            raise RuntimeError(f"the wire counter could not subscribe on {self._url} in 30 s")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)

    async def _listen(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        nc = await nats.connect(self._url)
        await nc.subscribe("$JS.API.>", cb=self._count)
        await nc.subscribe("$KV.>", cb=self._count)
        await nc.flush()
        self._listening.set()
        await self._done.wait()
        await nc.close()

    async def _count(self, msg: Msg) -> None:
        if msg.subject.startswith(REQUESTS):
            self.requests += 1
        if msg.subject.startswith(READS):
            self.reads += 1


@dataclass
class Window:
    """What one measurement window saw."""

    rate: float  # deliveries per second
    cpu_us: float  # the consumer thread's CPU per delivery
    requests_per_hold: float
    reads_per_hold: float
    spans_per_hold: float  # spans ended during the window (by the traced variant's SDK)


# What a window consumes with: its client, its handler and its delay cap (None: raw naks).
Taking = tuple[Client, Handler, DelayCap | None]


@dataclass
class Variant:
    """One way of taking the deliveries of consumer ``durable``. ``ready()``: may the window
    start counting (for a cap, once it has deferred every message)."""

    name: str
    durable: str
    taking: Callable[[], AbstractAsyncContextManager[Taking]]
    ready: Callable[[], bool] = lambda: True


async def window(variant: Variant, seconds: float, wire: Wire) -> Window:
    """Take ``variant``'s deliveries, counting for ``seconds`` once it is ready."""
    counted = 0
    counting = asyncio.Event()
    async with variant.taking() as (nc, handler, cap):

        async def counting_handler(msg: Msg) -> None:
            nonlocal counted
            await handler(msg)
            if counting.is_set():
                counted += 1
            elif variant.ready():
                counting.set()

        durable, js = variant.durable, nc.jetstream()
        # Paused at the end of its last window; resumed before anyone listens (resumed while
        # bound, a push consumer sometimes delivers nothing more).
        await js.resume_consumer("HOLDS", durable)
        config = ConsumerConfig(durable_name=durable, deliver_subject=f"deliver.{durable}")
        sub = await js.subscribe_bind(
            "HOLDS", config, durable, cb=counting_handler, manual_ack=True
        )
        await asyncio.wait_for(counting.wait(), 120)
        start, requests, reads = counted, wire.requests, wire.reads
        holds_before = cap.stats.holds if cap else 0
        spans_before = SPANS.ended
        began, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(seconds)  # the measurement window itself
        cpu, elapsed = time.thread_time() - cpu, time.perf_counter() - began
        deliveries = max(counted - start, 1)
        holds = max(cap.stats.holds - holds_before, 1) if cap else 1
        measured = Window(
            rate=deliveries / elapsed,
            cpu_us=cpu / deliveries * 1e6,
            requests_per_hold=(wire.requests - requests) / holds,
            reads_per_hold=(wire.reads - reads) / holds,
            spans_per_hold=(SPANS.ended - spans_before) / holds,
        )
        # Paused first: a delivery on its way when the subscription goes would reach nobody,
        # and come back only after ack_wait. Then drained: what was delivered is settled.
        await js.pause_consumer("HOLDS", durable, PAUSED_UNTIL)
        await sub.drain()
    return measured


def spread(values: list[float]) -> dict[str, object]:
    """The median of ``values``, their range, and the values in the order measured."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "windows": values,
    }


async def nak_short(msg: Msg) -> None:
    """Raw: the redelivery natsmw's holds make, without natsmw."""
    await msg.nak(delay=CAP)


async def defer(msg: Msg) -> None:
    """The handler under a cap: come back in an hour."""
    await msg.nak(delay=3600)


def held_with(limits_age: float | None) -> DelayCap:
    """A delay cap of ``CAP``; ``limits_age``: how old the consumer limits it holds with may be
    before it reads them again (``None``: natsmw's own, about half the cap)."""
    cap = with_delay_cap(CAP)
    if limits_age is not None:
        if not hasattr(cap, "_limits_age"):
            raise SystemExit("--limits-age: this natsmw's DelayCap has no _limits_age to set")
        cap._limits_age = limits_age
    return cap


def kept(
    nc: Client, handler: Handler, cap: DelayCap | None = None
) -> Callable[[], AbstractAsyncContextManager[Taking]]:
    """Every window takes with the same client, handler and cap."""

    @asynccontextmanager
    async def taking() -> AsyncIterator[Taking]:
        yield nc, handler, cap

    return taking


def another_instance(
    url: str, limits_age: float | None
) -> Callable[[], AbstractAsyncContextManager[Taking]]:
    """Every window takes with a client and a cap of its own, which know nothing yet."""

    @asynccontextmanager
    async def taking() -> AsyncIterator[Taking]:
        nc = await nats.connect(url)
        cap = held_with(limits_age)
        try:
            yield nc, cap(defer), cap
        finally:
            await nc.close()

    return taking


async def fill(nc: Client, messages: int) -> None:
    """The stream of ``messages`` messages, and a durable push consumer per variant."""
    js = nc.jetstream()
    await js.add_stream(name="HOLDS", subjects=["holds.>"])
    for durable in ("raw", "floor", "held", "traced", "held2x", "held10x"):
        config = ConsumerConfig(
            durable_name=durable,
            deliver_subject=f"deliver.{durable}",
            ack_wait=60,
            max_ack_pending=-1,
        )
        await js.add_consumer("HOLDS", config)
    for i in range(messages):
        await nc.publish("holds.job", b"x" * 128, headers={"Nats-Msg-Id": f"h{i}"})
    await nc.flush()


def variants(
    nc: Client, url: str, messages: int, limits_age: float | None
) -> tuple[Variant, Variant, list[Variant]]:
    """Raw, held, and the others: held on another instance and past the memory limit."""

    def deferred_by(cap: DelayCap) -> Callable[[], bool]:
        return lambda: cap.stats.capped >= messages

    deferring = held_with(limits_age)
    raw = Variant(RAW, "raw", kept(nc, nak_short))
    held = Variant(
        "held, deferring instance",
        "held",
        kept(nc, deferring(defer), deferring),
        deferred_by(deferring),
    )
    # On the consumer of "held", whose messages the deferring instance defers in the warm-up
    # round before the others run.
    traced = held_with(limits_age)
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SPANS)
    others = [
        Variant(FLOOR, "floor", kept(nc, hand_written_hold(CAP))),
        Variant(
            TRACED,
            "traced",
            kept(nc, compose(with_tracing(tracer_provider=provider), traced)(defer), traced),
            deferred_by(traced),
        ),
        Variant("held, another instance (cold cache)", "held", another_instance(url, limits_age)),
    ]
    for times in (2, 10):
        limited = held_with(limits_age)
        limited._memory = Deliveries(limit=messages // times)
        others.append(
            Variant(
                f"held, {times}x past the memory limit",
                f"held{times}x",
                kept(nc, limited(defer), limited),
                deferred_by(limited),
            )
        )
    return raw, held, others


async def run(
    messages: int, seconds: float, rounds: int, limits_age: float | None = None
) -> dict[str, dict[str, object]]:
    with NatsServer() as server, Wire(server.url) as wire:
        nc = await nats.connect(server.url)
        await fill(nc, messages)
        raw, held, others = variants(nc, server.url, messages, limits_age)
        windows: dict[str, list[Window]] = {v.name: [] for v in (raw, held, *others)}
        for round_ in range(-1, rounds):  # round -1 warms up
            for variant in [raw, held, *rotated(others, max(round_, 0), rounds)]:
                measured = await window(variant, seconds, wire)
                if round_ >= 0:
                    windows[variant.name].append(measured)
        await nc.close()
    return summary(windows)


def summary(windows: dict[str, list[Window]]) -> dict[str, dict[str, object]]:
    """Medians and ranges per variant; ratios against the raw window of the same round."""
    raw = windows[RAW]
    held = {name: got for name, got in windows.items() if name != RAW}
    return {
        "consumer CPU us per delivery": {
            name: spread([w.cpu_us for w in got]) for name, got in windows.items()
        },
        "consumer CPU per delivery vs raw nak": {
            name: spread([w.cpu_us / r.cpu_us for w, r in zip(got, raw, strict=True)])
            for name, got in held.items()
        },
        "deliveries per second": {
            name: spread([w.rate for w in got]) for name, got in windows.items()
        },
        "deliveries per second vs raw nak": {
            name: spread([w.rate / r.rate for w, r in zip(got, raw, strict=True)])
            for name, got in held.items()
        },
        "server requests per hold": {
            name: spread([w.requests_per_hold for w in got])
            for name, got in held.items()
            if name != FLOOR
        },
        "store reads per hold": {
            name: spread([w.reads_per_hold for w in got])
            for name, got in held.items()
            if name != FLOOR
        },
        "spans per hold": {
            TRACED: spread([w.spans_per_hold for w in windows[TRACED]]),
        },
    }


# What the report shows, in this order: a measure, how its figures read, and the ratios to
# raw of the same round that go beside it.
SHOWN = (
    ("consumer CPU us per delivery", "{:.1f}", "consumer CPU per delivery vs raw nak"),
    ("deliveries per second", "{:.0f}", "deliveries per second vs raw nak"),
    ("server requests per hold", "{:.4f}", None),
    ("store reads per hold", "{:.4f}", None),
    ("spans per hold", "{:.4f}", None),
)


def show(results: dict[str, dict[str, object]], messages: int, seconds: float, rounds: int) -> None:
    print(
        f"\nhold path: {messages} messages, {rounds} rounds of {seconds:g} s windows after a "
        "warm-up round; median (min-max) over the rounds"
    )
    for measure, number, against_raw in SHOWN:
        ratios = results[against_raw] if against_raw else {}
        print(f"\n  {measure}" + ("  (and against raw, in the same round)" if ratios else ""))
        for name, values in results[measure].items():
            line = f"    {name:38s} {_range(values, number):28s}"
            if name in ratios:
                line += f"  {_range(ratios[name], '{:.2f}x')}"
            print(line.rstrip())


def _range(values: object, number: str) -> str:
    assert isinstance(values, dict)
    median, low, high = (number.format(values[k]) for k in ("median", "min", "max"))
    return f"{median:>8s} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0, help="each window's length")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after a warm-up")
    parser.add_argument(
        "--limits-age",
        type=float,
        help="seconds a cap's reading of the consumer's limits (max_deliver) is trusted; "
        "natsmw's own is about half the cap, at least 0.1 s (13.5: a 30 s cap's)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/holds.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.messages, args.seconds, args.rounds, args.limits_age))
    show(results, args.messages, args.seconds, args.rounds)
    settings = {
        "messages": args.messages,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "limits_age": args.limits_age,
    }
    write_report(args.out, "hold path", results, unit="median_and_range", **settings)


if __name__ == "__main__":
    main()
