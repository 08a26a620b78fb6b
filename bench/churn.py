"""Clients and consumers that come and go, through one delay cap: memory stays flat.

    python -m bench.churn [--clients 1000] [--consumers 10]

A service that reconnects, and makes ephemeral consumers by the thousand, keeps one delay cap
for its whole life. Here ``clients`` clients are opened and closed in turn; each makes
``consumers`` ephemeral pull consumers, and each consumer's one message goes through the
cap: the handler defers it by an hour (a deadline recorded, remembered, and the message held
once), then the consumer and the client go. Every 10 % of the clients, after a garbage
collection, the process's traced memory (tracemalloc) and the size of what the cap keeps are
sampled. Flat means: the memory of the second half grows by next to nothing per client.
Results go to bench/results/churn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench.common import write_report
from natsmw import with_delay_cap
from natsmw.delay import DelayCap
from natsmw.delay.clock import server_clock
from natsmw.server import NatsServer

CAP = 0.05


def kept(cap: DelayCap) -> dict[str, int]:
    """What the cap (and the process-wide clock) keeps, by kind."""
    return {
        "remembered messages": len(cap._memory),
        "clients with consumer generations": len(cap._generations),
        "consumer generations": sum(len(known) for known in cap._generations.values()),
        "clients with limits": len(cap._limits._known),
        "clients with stores": len(cap._stores),
        "clock readings": len(server_clock._readings),
    }


async def one_client(url: str, cap: DelayCap, consumers: int, client: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    held = asyncio.Event()
    deferred: set[int] = set()

    async def defers(msg: Msg) -> None:
        if msg.metadata.num_delivered == 1:
            await msg.nak(delay=3600)
            deferred.add(msg.metadata.sequence.stream)
        else:
            held.set()  # never reached: the cap holds it

    handler = cap(defers)
    for n in range(consumers):
        subject = f"churn.{client}.{n}"
        await js.publish(subject, b"x" * 64)
        psub = await js.pull_subscribe(
            subject, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_wait=30)
        )
        (msg,) = await psub.fetch(1, timeout=10)
        await handler(msg)  # deferred: a record written, the nak capped
        (msg,) = await psub.fetch(1, timeout=10)
        await handler(msg)  # held, without a handler call
        await psub.unsubscribe()
    await nc.close()
    assert not held.is_set(), "a handler ran before its deadline"
    assert len(deferred) == consumers


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points) or 1.0
    return num / den


async def run(clients: int, consumers: int) -> dict[str, object]:
    with NatsServer() as server:
        setup = await nats.connect(server.url)
        await setup.jetstream().add_stream(name="CHURN", subjects=["churn.>"])
        await setup.close()
        cap = with_delay_cap(CAP, parking=False)
        samples: list[dict[str, float]] = []
        every = max(clients // 10, 1)
        tracemalloc.start()
        began = time.perf_counter()
        for client in range(1, clients + 1):
            await one_client(server.url, cap, consumers, client)
            if client % every == 0:
                await asyncio.sleep(0.05)  # nats-py's own tasks of closed clients end
                gc.collect()
                sample: dict[str, float] = {
                    "clients": client,
                    "traced_kib": tracemalloc.get_traced_memory()[0] / 1024,
                    **kept(cap),
                }
                samples.append(sample)
                print(
                    f"  {client:6d} clients  {sample['traced_kib']:9.0f} KiB traced  "
                    + "  ".join(f"{name}={value}" for name, value in kept(cap).items()),
                    flush=True,
                )
        elapsed = time.perf_counter() - began
        tracemalloc.stop()
        stats = cap.stats
    second_half = [(s["clients"], s["traced_kib"]) for s in samples[len(samples) // 2 :]]
    growth = slope(second_half) * 1024 if len(second_half) > 1 else float("nan")
    results: dict[str, object] = {
        "clients": clients,
        "ephemeral consumers": clients * consumers,
        "deferred and held": stats.capped,
        "holds": stats.holds,
        "seconds": round(elapsed, 1),
        "traced KiB, first sample": round(samples[0]["traced_kib"]),
        "traced KiB, last sample": round(samples[-1]["traced_kib"]),
        "bytes per client, second half (slope)": round(growth),
        "kept at the end": kept(cap),
        "samples": samples,
    }
    print(f"\nchurn: {clients} clients x {consumers} ephemeral consumers in {elapsed:.0f} s")
    for name in list(results)[:-2]:
        print(f"  {name:40s} {results[name]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=10, help="per client")
    parser.add_argument("--out", type=Path, default=Path("bench/results/churn.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.clients, args.consumers))
    write_report(
        args.out, "churn", results, unit="memory", clients=args.clients, consumers=args.consumers
    )


if __name__ == "__main__":
    main()
