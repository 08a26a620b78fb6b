"""natsmw's own CPU cost per message, without a server: handlers run on nats-py messages
built in memory, whose client only swallows what is published.

    python -m bench.micro [--messages N] [--rounds R]

Each row gives the time per message (the best of R rounds, so that the machine's noise
counts least) and the function calls per message (Python and built-in), counted with
cProfile: a figure that does not move with the machine's load, which makes before/after
comparisons exact.
Results go to bench/results/micro.json.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from bench.common import hand_written_chain, hand_written_hold, write_report
from bench.consume import full_chain, proxy_only
from natsmw import MemoryDeadlineStore, compose, with_delay_cap, with_size_limit, with_tracing

Handler = Callable[[Msg], Awaitable[None]]
STORED = time.time_ns()
CREATED = datetime.fromtimestamp(STORED / 1e9 - 60, timezone.utc)


class Client:
    """Just enough of a nats-py client for settlements and the delay cap's consumer info."""

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        pass

    def jetstream(self, **_: Any) -> Client:
        return self

    async def consumer_info(self, *_: Any, **__: Any) -> Any:
        return SimpleNamespace(
            config=SimpleNamespace(max_deliver=-1, durable_name="micro", ack_policy=None),
            created=CREATED,  # the consumer was made before its messages were stored
        )


CLIENT = Client()


def messages(count: int, delivered: int = 1, first: int = 1) -> list[Msg]:
    """JetStream deliveries of ``count`` stored messages from sequence ``first``, 2 headers
    each."""
    return [
        Msg(
            _client=CLIENT,  # type: ignore[arg-type]
            subject="bench.msgs",
            reply=f"$JS.ACK.BENCH.d.{delivered}.{seq}.{seq}.{STORED}.0",
            data=b"x" * 128,
            headers={"Nats-Msg-Id": f"id-{seq}", "X-Header": "v"},
        )
        for seq in range(first, first + count)
    ]


def drive(handler: Handler, batch: Iterable[Msg]) -> None:
    """Run the handler on each message to completion, as nats-py's callback loop would."""
    for msg in batch:
        coroutine = handler(msg)
        try:
            coroutine.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            continue
        raise RuntimeError("the handler waited for something: not a CPU-only benchmark")


async def ack(msg: Msg) -> None:
    _ = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    await msg.ack()


async def nak(msg: Msg) -> None:
    await msg.nak(delay=60)


async def defer(msg: Msg) -> None:
    await msg.nak(delay=3600)


def bare_span(provider: TracerProvider) -> Handler:
    tracer = provider.get_tracer("bench")

    async def handle(msg: Msg) -> None:
        with tracer.start_as_current_span(f"process {msg.subject}", kind=SpanKind.CONSUMER):
            await ack(msg)

    return handle


def held(count: int) -> tuple[Handler, Callable[[int], list[Msg]]]:
    """A delay cap that has deferred ``count`` messages: each later delivery is a hold."""
    handler = with_delay_cap(60, store=MemoryDeadlineStore())(defer)
    drive(handler, messages(count))
    deliveries = iter(range(2, 1 << 30))
    return handler, lambda n: messages(n, next(deliveries))


DEFER = b"defer: " + b"x" * 122  # this very object as a body: the handler defers


async def ack_unless_deferred(msg: Msg) -> None:
    """``ack``, but a message whose body is ``DEFER`` itself is deferred by an hour (one
    identity check, so that the row compares with the one of ``ack``)."""
    if msg.data is DEFER:
        await msg.nak(delay=3600)
        return
    _ = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    await msg.ack()


def holding(count: int) -> Handler:
    """The full chain around ``ack_unless_deferred``, its delay cap holding ``count`` messages
    of the same consumer (deferred by an hour, at sequences past those measured)."""
    guard = with_size_limit(max_body=1 << 20, max_headers=1000)
    chain = compose(guard, with_delay_cap(60, store=MemoryDeadlineStore()))(ack_unless_deferred)
    deferred = messages(count, first=1 << 40)
    for msg in deferred:
        msg.data = DEFER
    drive(chain, deferred)
    return chain


def measure(
    handler: Handler, make: Callable[[int], list[Msg]], count: int, rounds: int
) -> tuple[float, float]:
    """(µs per message, best of ``rounds``; Python calls per message)."""
    best = float("inf")
    for _ in range(rounds):
        batch = make(count)
        started = time.perf_counter()
        drive(handler, batch)
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    profile = cProfile.Profile()
    size = min(count, 1000)  # held() deferred ``count`` messages: no more are redeliveries
    profile.runcall(drive, handler, make(size))
    calls: float = pstats.Stats(profile).total_calls / size  # type: ignore[attr-defined]
    return best, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results/micro.json"))
    args = parser.parse_args()
    sampled_out = TracerProvider(sampler=ALWAYS_OFF)
    hold, redeliveries = held(args.messages)
    floor = hand_written_hold(60)
    drive(floor, messages(args.messages))  # deferred once: later deliveries are holds
    floor_deliveries = iter(range(2, 1 << 30))

    def floor_redeliveries(n: int) -> list[Msg]:
        return messages(n, next(floor_deliveries))

    fresh = messages
    groups: dict[str, list[tuple[str, Handler, Callable[[int], list[Msg]]]]] = {
        "first delivery, handler acks": [
            ("raw nats-py", ack, fresh),
            ("one no-op middleware (the floor)", proxy_only(ack), fresh),
            ("full chain (guard+cap)", full_chain(ack), fresh),
            ("hand-written guard+cap checks, no proxy", hand_written_chain(ack, 60), fresh),
            ("the same checks, natsmw's proxy", hand_written_chain(ack, 60, proxy=True), fresh),
            ("full chain, 1000 others held", holding(1000), fresh),
            ("bare SDK span, sampled out", bare_span(sampled_out), fresh),
            ("with_tracing, sampled out", with_tracing(tracer_provider=sampled_out)(ack), fresh),
            ("with_tracing(), no SDK configured", with_tracing()(ack), fresh),
        ],
        "redelivery before the deadline": [
            ("raw nats-py nak(delay=60)", nak, fresh),
            ("hand-written hold (the floor)", floor, floor_redeliveries),
            ("hold, on the deferring instance", hold, redeliveries),
        ],
    }  # fmt: skip
    results: dict[str, dict[str, dict[str, float]]] = {}
    for title, rows in groups.items():
        print(f"\n{title}: {args.messages} messages, best of {args.rounds} rounds")
        results[title] = {}
        raw_us = None
        for name, handler, make in rows:
            us, calls = measure(handler, make, args.messages, args.rounds)
            raw_us = us if raw_us is None else raw_us
            results[title][name] = {"us_per_msg": us, "calls_per_msg": calls}
            extra = us - raw_us
            print(f"  {name:40s} {us:7.2f} us/msg  {extra:+7.2f} over raw  {calls:6.1f} calls")
    write_report(args.out, "natsmw CPU cost per message, no server", results,
                 unit="per_msg", messages=args.messages, rounds=args.rounds)  # fmt: skip


if __name__ == "__main__":
    main()
