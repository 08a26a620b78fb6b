"""The hold path: held redeliveries per second against raw nak throughput, in one run.

    python -m bench.holds [--messages 2000] [--seconds 10]

Raw: a consumer whose handler naks every delivery with the same short delay natsmw holds
with (``nak(delay=CAP)``), so that both go through the server's redelivery timer. Held: the
same consumer wrapped in with_delay_cap, every message deferred by an hour, held with a cap
short enough that the rate is the client's, not the cap's. Measured on the instance that
deferred the messages and on another instance (another connection, nothing cached), with
every JetStream API and KV request that natsmw makes counted on the wire. Then again with
the cap's memory limited to a half and a tenth of the messages held (2x and 10x past its
limit): reads per hold and holds per second there. Results go to bench/results/holds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from bench.common import write_report
from natsmw import with_delay_cap
from natsmw.delay import DelayCap
from natsmw.delay.memory import Deliveries
from natsmw.server import NatsServer

CAP = 0.001  # a redelivery delay short enough that the client, not the delay, sets the rate
REQUESTS = ("$JS.API.CONSUMER.INFO.", "$JS.API.DIRECT.GET.", "$JS.API.STREAM.MSG.GET.", "$KV.")


async def rate(
    nc: Client, consumer: str, handler: Callable[[Msg], Awaitable[None]], seconds: float,
    ready: Callable[[], bool] = lambda: True,
) -> float:  # fmt: skip
    """Deliveries per second through ``handler`` over ``seconds``, counted once ``ready()``;
    also records in ``CPU`` this process's CPU time per delivery over the same window."""
    counted = 0
    counting = asyncio.Event()

    async def counting_handler(msg: Msg) -> None:
        nonlocal counted
        await handler(msg)
        if counting.is_set():
            counted += 1
        elif ready():
            counting.set()

    config = ConsumerConfig(durable_name=consumer, deliver_subject=f"deliver.{consumer}")
    js = nc.jetstream()
    sub = await js.subscribe_bind("HOLDS", config, consumer, cb=counting_handler, manual_ack=True)
    await asyncio.wait_for(counting.wait(), 120)
    start = counted
    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)  # the measurement window itself
    result = (counted - start) / (time.perf_counter() - began)
    CPU[consumer] = (time.process_time() - cpu) / max(counted - start, 1)
    await sub.unsubscribe()
    return result


CPU: dict[str, float] = {}  # client CPU seconds per delivery, by consumer, of the last window


async def run(messages: int, seconds: float) -> dict[str, object]:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="HOLDS", subjects=["holds.>"])
        for consumer in ("raw", "held", "held2x", "held10x"):
            await js.add_consumer("HOLDS", ConsumerConfig(
                durable_name=consumer, deliver_subject=f"deliver.{consumer}", ack_wait=60,
                max_ack_pending=-1))  # fmt: skip
        for i in range(messages):
            await nc.publish("holds.job", b"x" * 128, headers={"Nats-Msg-Id": f"h{i}"})
        await nc.flush()
        requests: list[str] = []

        async def spy(msg: Msg) -> None:
            if msg.subject.startswith(REQUESTS):
                requests.append(msg.subject)

        await nc.subscribe("$JS.API.>", cb=spy)
        await nc.subscribe("$KV.>", cb=spy)

        async def nak_short(msg: Msg) -> None:
            await msg.nak(delay=CAP)

        raw = await rate(nc, "raw", nak_short, seconds)
        raw_cpu = CPU["raw"]

        async def defer(msg: Msg) -> None:
            await msg.nak(delay=3600)

        deferring = with_delay_cap(CAP)
        held = await rate(nc, "held", deferring(defer), seconds,
                          ready=lambda: deferring.stats.capped >= messages)  # fmt: skip
        held_cpu = CPU["held"]
        before = len(requests)
        holds_before = deferring.stats.holds
        held_again = await rate(nc, "held", deferring(defer), seconds)
        if held_again > held:
            held_cpu = CPU["held"]  # the CPU of the window whose rate is reported
        per_hold_deferring = (len(requests) - before) / max(deferring.stats.holds - holds_before, 1)

        past_limit: dict[str, float] = {}
        for times in (2, 10):
            limited: DelayCap = with_delay_cap(CAP)
            limited._memory = Deliveries(limit=messages // times)
            await rate(nc, f"held{times}x", limited(defer), seconds,
                       ready=lambda cap=limited: cap.stats.capped >= messages)  # fmt: skip
            before, holds_before = len(requests), limited.stats.holds
            past_limit[f"held, {times}x past the memory limit"] = await rate(
                nc, f"held{times}x", limited(defer), seconds
            )
            reads = sum(1 for subject in requests[before:] if not subject.startswith(
                "$JS.API.CONSUMER.INFO."))  # fmt: skip
            past_limit[f"store reads per hold, {times}x past the memory limit"] = reads / max(
                limited.stats.holds - holds_before, 1
            )

        other_nc = await nats.connect(server.url)
        other: DelayCap = with_delay_cap(CAP)
        before = len(requests)
        other_rate = await rate(other_nc, "held", other(defer), seconds)
        per_hold_other = (len(requests) - before) / max(other.stats.holds, 1)
        await other_nc.close()
        await nc.close()

    results = {
        "raw nak": raw,
        "held, deferring instance": max(held, held_again),
        "held, another instance (cold cache)": other_rate,
        "client CPU us per raw nak": raw_cpu * 1e6,
        "client CPU us per hold, deferring instance": held_cpu * 1e6,
        "requests per hold, deferring instance": per_hold_deferring,
        "requests per hold, another instance": per_hold_other,
        **past_limit,
    }
    print(f"\nhold path: {messages} messages, {seconds:.0f} s windows")
    for name, value in results.items():
        if name.startswith(("requests", "store reads")):
            print(f"  {name:44s} {value:8.4f}")
        elif name.startswith("client CPU"):
            print(f"  {name:44s} {value:8.1f}")
        else:
            print(f"  {name:44s} {value:8.0f} /s  {value / raw:5.2f}x raw")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/holds.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.messages, args.seconds))
    write_report(args.out, "hold path", results, messages=args.messages, seconds=args.seconds)


if __name__ == "__main__":
    main()
