"""The long-delay scenario of nats.go issue 1830, as a soak.

    python -m bench.soak [--messages 100000] [--cycles 30] [--cap 10] [--delay 10800]
                         [--memory-limit 66666]

Every one of ``messages`` stored messages (5 headers each) is deferred by its handler for
``delay`` seconds (hours), under ``with_delay_cap(cap)`` and lazy headers, in a consumer
process of its own. The cap's memory is limited to ``memory-limit`` messages, by default two
thirds of them: the soak runs past the limit (1.5x), as a long-delay service with more
messages held than the cap remembers would, and the messages not remembered cost a deadline
read from the store each time they come back. The soak runs until natsmw has held every
message ``cycles`` times, sampling the consumer's RSS and the server's, and counting the
store reads on the wire (from this process, not the consumer's). It checks that nothing is
lost (every message still pending on the consumer) and nothing is early (no handler call
after the first), and reports holds per second, store reads per hold and the server-side cost
(ack-pending, the deadline bucket's size). Results go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from bench.common import write_report
from natsmw.server import NatsServer

# A deadline read from natsmw's bucket, on the wire: a direct get, or a stream message get.
STORE_READS = (
    "$JS.API.DIRECT.GET.KV_natsmw_deadlines",
    "$JS.API.DIRECT.GET.KV_natsmw_deadlines.>",
    "$JS.API.STREAM.MSG.GET.KV_natsmw_deadlines",
)


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


async def run(
    messages: int, cycles: int, cap: float, delay: float, memory_limit: int
) -> dict[str, object]:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        reads = 0

        async def count_read(msg: Msg) -> None:
            nonlocal reads
            reads += 1

        for subject in STORE_READS:
            await nc.subscribe(subject, cb=count_read)
        await js.add_stream(name="SOAK", subjects=["soak.>"])
        for i in range(messages):
            headers = {f"X-Header-{h}": f"value-{h}-{i}" for h in range(4)}
            headers["Nats-Msg-Id"] = f"soak-{i}"
            await nc.publish("soak.job", b"x" * 256, headers=headers)
            if i % 10_000 == 0:
                await nc.flush()
        await nc.flush()
        await js.add_consumer(
            "SOAK", ConsumerConfig(durable_name="soak", ack_wait=cap * 6, max_ack_pending=-1)
        )
        assert server._process is not None
        server_pid = server._process.pid
        started = time.time()
        child = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.soak_consumer", server.url),
            *(str(cap), str(delay), str(memory_limit)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        samples: list[dict[str, float]] = []
        try:
            async for line in child.stdout:
                sample = json.loads(line)
                sample["server_rss_mb"] = server_rss_mb(server_pid)
                sample["cycle"] = sample["holds"] / messages
                sample["store_reads"] = reads
                previous = samples[-1] if samples else sample
                samples.append(sample)
                print(
                    f"  t={sample['t'] - started:6.0f}s cycle={sample['cycle']:5.2f} "
                    f"client={sample['rss_mb']:6.1f} MB server={sample['server_rss_mb']:6.1f} MB "
                    f"calls={sample['calls']} early={sample['early']} "
                    f"remembered={sample['remembered']} "
                    f"holds/s={_per(sample, previous, 'holds', 't'):6.0f} "
                    f"reads/hold={_per(sample, previous, 'store_reads', 'holds'):5.3f}",
                    flush=True,
                )
                if sample["cycle"] >= cycles:
                    break
        finally:
            child.kill()
            await child.wait()
        consumer = await js.consumer_info("SOAK", "soak")
        stream = await js.stream_info("SOAK")
        bucket = await js.stream_info("KV_natsmw_deadlines")
        await nc.close()

    # Measured from the moment every message has been deferred once: before that, the
    # consumer is still taking its first deliveries and remembering their deadlines.
    warm = [s for s in samples if s["calls"] >= messages] or samples
    growth = warm[-1]["rss_mb"] - warm[0]["rss_mb"]
    per_cycle = slope([(s["cycle"], s["rss_mb"]) for s in warm])
    last = samples[-1]
    return {
        "messages": messages,
        "memory_limit": memory_limit,
        "cycles_held": last["cycle"],
        "seconds": last["t"] - started,
        # From the moment every message has been deferred once, as the RSS growth below.
        "holds_per_s": _per(last, warm[0], "holds", "t"),
        "store_reads_per_hold": _per(last, warm[0], "store_reads", "holds"),
        # What the memory promises past its limit: the messages it remembers are read never,
        # the others once per hold.
        "store_reads_per_hold_by_design": max(1 - memory_limit / messages, 0.0),
        "remembered_max": max(s["remembered"] for s in samples),
        "client_rss_mb": {
            "start": samples[0]["rss_mb"],
            "all_deferred": warm[0]["rss_mb"],
            "end": last["rss_mb"],
            "growth_after_all_deferred": growth,
            "slope_mb_per_cycle": per_cycle,
        },
        "server_rss_mb": {
            "all_deferred": warm[0]["server_rss_mb"],
            "end": last["server_rss_mb"],
        },
        "handler_calls": last["calls"],
        "early_calls": last["early"],
        "holds": last["holds"],
        "consumer_ack_pending": consumer.num_ack_pending,
        "consumer_num_pending": consumer.num_pending,
        "stream_messages": stream.state.messages,
        "deadline_bucket": {"entries": bucket.state.messages, "bytes": bucket.state.bytes},
        "samples": samples,
    }


def _per(now: dict[str, float], then: dict[str, float], counted: str, over: str) -> float:
    """How many ``counted`` per ``over`` from sample ``then`` to sample ``now``."""
    span = now[over] - then[over]
    return (now[counted] - then[counted]) / span if span else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--cap", type=float, default=10.0)
    parser.add_argument("--delay", type=float, default=3 * 3600)
    parser.add_argument(
        "--memory-limit",
        type=int,
        help="messages the cap's memory remembers; by default two thirds of --messages",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    memory_limit = args.messages * 2 // 3 if args.memory_limit is None else args.memory_limit
    result = asyncio.run(run(args.messages, args.cycles, args.cap, args.delay, memory_limit))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    settings = {
        "messages": args.messages,
        "cycles": args.cycles,
        "cap": args.cap,
        "memory_limit": memory_limit,
    }
    write_report(args.out, "long-delay soak (nats.go issue 1830)", result, **settings)


if __name__ == "__main__":
    main()
