"""The consumer process of bench/park.py: a legacy handler that defers every message once,
then acks it when called again, under a delay cap that holds or parks; it prints its own RSS
and counters as JSON lines, and, when its stdin closes, a last line with the lateness of every
second call and the deliveries each message took.

    python -m bench.park_consumer <url> <hold|park> <cap s> <delay s> <messages> <durable> \
        [<serve_parked keyword arguments, as JSON>]
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from array import array
from typing import Any

import nats
from nats.aio.msg import Msg

from natsmw import install, serve_parked, with_delay_cap

_PAGE = os.sysconf("SC_PAGE_SIZE")
STREAM = "SEED"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank); NaN when there are none."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def main(
    url: str,
    tier: str,
    cap_s: float,
    delay: float,
    messages: int,
    durable: str,
    serving_options: dict[str, Any],
) -> None:
    nc = await nats.connect(url, name=f"bench-park-{tier}", max_reconnect_attempts=-1)
    install(nc)  # lazy headers, as in bench.soak
    js = nc.jetstream()
    cap = with_delay_cap(cap_s, parking=tier == "park")
    # Per stream sequence, allocated up front so that the RSS measured while the messages
    # are deferred is natsmw's and nats-py's, not the benchmark's bookkeeping.
    deadline = array("d", bytes(8 * (messages + 1)))  # asked: first call + delay
    answered = array("d", bytes(8 * (messages + 1)))  # when the second call came
    deliveries = array("L", bytes(array("L").itemsize * (messages + 1)))
    counts = {"first": 0, "done": 0, "early": 0, "extra": 0, "unknown": 0}
    span = {"first_deadline": math.inf, "last_deadline": 0.0}

    @cap
    async def handle(msg: Msg) -> None:
        # "Come back in `delay` seconds", then done. A DueMsg carries the original's sequence.
        now = time.time()
        seq = msg.metadata.sequence.stream
        if not 0 < seq <= messages:
            counts["unknown"] += 1
            await msg.ack()
            return
        if deadline[seq] == 0.0:
            counts["first"] += 1
            deadline[seq] = now + delay
            span["first_deadline"] = min(span["first_deadline"], deadline[seq])
            span["last_deadline"] = max(span["last_deadline"], deadline[seq])
            await msg.nak(delay=delay)
            return
        if answered[seq] != 0.0:
            counts["extra"] += 1  # a third call: the message came back after it was acked
        else:
            answered[seq] = now
            deliveries[seq] = msg.metadata.num_delivered
            counts["done"] += 1
            if now < deadline[seq]:
                counts["early"] += 1
        await msg.ack()

    serving = None
    if tier == "park":
        serving = await serve_parked(
            js, handle, stream=STREAM, consumer=durable, manual_ack=True, **serving_options
        )
    psub = await js.pull_subscribe_bind(durable, STREAM)

    def sample() -> dict[str, Any]:
        stats = cap.stats
        return {"t": time.time(), "rss_mb": rss_mb(), "cpu_s": time.process_time(), **counts,
                **span, "holds": stats.holds, "parked": stats.parked, "unparked": stats.unparked,
                "capped": stats.capped, "park_fallbacks": stats.park_fallbacks}  # fmt: skip

    async def report() -> None:
        while True:
            print(json.dumps(sample()), flush=True)
            await asyncio.sleep(1.0)

    stopping = asyncio.Event()

    async def pull() -> None:
        while not stopping.is_set():
            try:
                batch = await psub.fetch(500, timeout=1.0)
            except asyncio.TimeoutError:
                continue
            except nats.errors.Error:
                await asyncio.sleep(0.1)  # not a busy loop while the connection is away
                continue
            await asyncio.gather(*(handle(msg) for msg in batch))

    reporter = asyncio.create_task(report())
    puller = asyncio.create_task(pull())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the benchmark closes our stdin
    stopping.set()
    reporter.cancel()
    await asyncio.wait([puller], timeout=5)  # the fetch under way ends within its timeout
    puller.cancel()
    print(json.dumps(final_line(sample(), deadline, answered, deliveries, messages)), flush=True)
    if serving is not None:
        began = time.monotonic()
        try:
            await asyncio.wait_for(serving.stop(), 30)
        except asyncio.TimeoutError:
            print("bench.park_consumer: serving.stop() did not return in 30 s", file=sys.stderr)
        else:
            if time.monotonic() - began > 5:
                print(f"bench.park_consumer: serving.stop() took {time.monotonic() - began:.1f}s",
                      file=sys.stderr)  # fmt: skip
    await asyncio.wait_for(nc.close(), 10)


def final_line(
    last: dict[str, Any],
    deadline: array[float],
    answered: array[float],
    deliveries: array[int],
    messages: int,
) -> dict[str, Any]:
    """The last sample, with the lateness of the second calls and the deliveries they took.

    A message not called again counts as late by the time to now: the quantiles are then
    lower bounds, and ``lower_bound`` says so.
    """
    now = time.time()
    lateness = sorted(
        (answered[s] or now) - deadline[s] for s in range(1, messages + 1) if deadline[s]
    )
    took = [deliveries[s] for s in range(1, messages + 1) if answered[s]]
    return {
        **last,
        "final": True,
        "lateness_s": {
            "p50": quantile(lateness, 0.50),
            "p99": quantile(lateness, 0.99),
            "max": lateness[-1] if lateness else math.nan,
            "min": lateness[0] if lateness else math.nan,
            "lower_bound": last["done"] < messages,
        },
        "deliveries_per_message": {
            "mean": sum(took) / len(took) if took else math.nan,
            "max": max(took, default=0),
        },
    }


if __name__ == "__main__":
    url, tier, cap_s, delay, messages, durable = sys.argv[1:7]
    options = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    asyncio.run(main(url, tier, float(cap_s), float(delay), int(messages), durable, options))
