"""The consumer process of bench/soak.py: a legacy handler that defers every message by hours,
under a delay cap whose memory holds at most ``memory limit`` messages, with lazy headers; it
prints its own RSS and counters as JSON lines.

    python -m bench.soak_consumer <url> <cap seconds> <delay seconds> <memory limit>
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import nats
from nats.aio.msg import Msg

from natsmw import handler_calls, install, with_delay_cap
from natsmw.delay.memory import Deliveries

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


async def main(url: str, cap_s: float, delay: float, memory_limit: int) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    install(nc)
    js = nc.jetstream()
    cap = with_delay_cap(cap_s)
    # The memory the cap makes for itself (its idle time: two caps), with a lower limit: the
    # messages it does not remember cost a store read each time they come back.
    cap._memory = Deliveries(limit=memory_limit, idle=max(60.0, 2 * cap_s))
    counts = {"calls": 0, "early": 0}

    @cap
    async def handle(msg: Msg) -> None:  # the legacy handler: "come back in three hours"
        counts["calls"] += 1
        if handler_calls(msg) > 1:
            counts["early"] += 1  # a second call hours before the deadline: must never happen
        await msg.nak(delay=delay)

    psub = await js.pull_subscribe_bind("soak", "SOAK")

    async def report() -> None:
        while True:
            line = {
                "t": time.time(),
                "rss_mb": rss_mb(),
                **counts,
                "holds": cap.stats.holds,
                "remembered": len(cap._memory),
            }
            print(json.dumps(line), flush=True)
            await asyncio.sleep(1.0)

    reporter = asyncio.create_task(report())
    while True:
        try:
            batch = await psub.fetch(500, timeout=1.0)
        except (asyncio.TimeoutError, nats.errors.Error):
            continue
        await asyncio.gather(*(handle(msg) for msg in batch))
    reporter.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
