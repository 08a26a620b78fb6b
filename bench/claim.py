"""Claim checks (issue 18): a consumer reading large bodies sent by reference, natsmw's
``with_claim_check`` against plain nats-py object store calls, in the same run.

    python -m bench.claim [--messages 100] [--size 10485760] [--rounds 2]

On one embedded server, ``--messages`` messages are published with ``natsmw.publish(js,
subject, body, claim_check=ClaimCheck(threshold=1 MiB))``: each body (``--size`` bytes of
``os.urandom``, a different one per message) is stored in an object store bucket and the
message carries a ``Natsmw-Claim`` header and an empty body. Then each variant consumes all of
them through a push consumer of its own (``js.subscribe`` with a durable, manual acks; ack
wait an hour, so that nothing is redelivered while the callback works through the queue),
its handler checking the body's length and acking:

* ``plain``: what a user writes with nats-py alone: ``json.loads`` of the header, then
  ``(await store.get(name)).data`` (the ``ObjectStore`` opened once and kept). Without
  ``writeinto``, nats-py builds the body by ``bytes +=``, chunk by chunk (128 KiB chunks):
  copying that grows with the square of the size;
* ``plain, writeinto``: the same with ``store.get(name, writeinto=io.BytesIO())``, as natsmw
  reads (nats-py then hands each chunk's write to the default thread pool);
* ``natsmw``: ``with_claim_check()(handler)``: the header parsed and checked, the object's
  info read and checked against the claim, then the body read as natsmw reads it (since
  ``f429b55``: its chunks taken from an ordered consumer of its own, hashed, and joined
  once; before, ``store.get`` with ``writeinto``), its size and digest checked again.

Every variant runs as a process of its own (``--child``), started fresh for each round, so
that its peak RSS (``getrusage``'s ``ru_maxrss``) is its own; the plain ones do not import
natsmw. A child measures, from its subscribe to its last ack: wall time, its CPU time
(``time.process_time``: every thread of the process) and its RSS before and at peak. A
warm-up round runs every variant once, not counted; then ``--rounds`` rounds, the order
rotating. Figures are medians over the rounds; ratios are the median of the per-round ratios
of natsmw (or ``plain, writeinto``) to ``plain`` in the same round. Results go to
bench/results/claim.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.js.object_store import ObjectStore

STREAM = "CLAIMS"
SUBJECT = "claims.new"
BUCKET = "bench_claims"
HEADER = "Natsmw-Claim"  # natsmw.CLAIM_HEADER, written out: the plain children skip natsmw
THRESHOLD = 1 << 20
VARIANTS = {
    "plain": "plain nats-py: store.get(name).data",
    "plain-writeinto": "plain nats-py: store.get(name, writeinto=BytesIO)",
    "natsmw": "natsmw: with_claim_check()(handler)",
}
BASELINE = "plain"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the consumer, a process of its own -----------------------------------------------------


async def child(kind: str, url: str, messages: int, size: int, durable: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    counts = {"handled": 0, "wrong_size": 0, "redelivered": 0}
    seen: set[int] = set()
    done = asyncio.Event()

    def check(msg: Msg, length: int) -> None:
        counts["handled"] += 1
        if length != size:
            counts["wrong_size"] += 1
        if msg.metadata.num_delivered > 1:
            counts["redelivered"] += 1
        seen.add(msg.metadata.sequence.stream)
        if len(seen) == messages:
            done.set()

    stores: dict[str, ObjectStore] = {}

    async def store_of(bucket: str) -> ObjectStore:
        store = stores.get(bucket)
        if store is None:
            store = stores[bucket] = await js.object_store(bucket)
        return store

    async def plain(msg: Msg) -> None:
        claim = json.loads((msg.headers or {})[HEADER])
        data = (await (await store_of(claim["bucket"])).get(claim["name"])).data or b""
        check(msg, len(data))
        await msg.ack()

    async def plain_writeinto(msg: Msg) -> None:
        claim = json.loads((msg.headers or {})[HEADER])
        buffer = io.BytesIO()
        await (await store_of(claim["bucket"])).get(claim["name"], writeinto=buffer)
        data = buffer.getvalue()
        check(msg, len(data))
        await msg.ack()

    async def bare(msg: Msg) -> None:
        check(msg, len(msg.data))
        await msg.ack()

    handler: Callable[[Msg], Awaitable[None]]
    if kind == "plain":
        handler = plain
    elif kind == "plain-writeinto":
        handler = plain_writeinto
    elif kind == "natsmw":
        from natsmw import with_claim_check

        handler = with_claim_check(max_size=max(size, 64 << 20))(bare)
    else:
        raise SystemExit(f"no variant {kind!r}")

    ready_rss = rss_mib()
    ready_peak = peak_rss_mib()
    cpu = time.process_time()
    began = time.perf_counter()
    sub = await js.subscribe(
        SUBJECT,
        durable=durable,
        cb=handler,
        manual_ack=True,
        config=ConsumerConfig(ack_wait=3600),
        pending_msgs_limit=-1,
    )
    await asyncio.wait_for(done.wait(), 3600)
    await nc.flush()  # the last ack sent
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu
    peak = peak_rss_mib()
    await sub.unsubscribe()
    await js.delete_consumer(STREAM, durable)
    await nc.close()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_ready_mib": ready_rss,
        "peak_rss_ready_mib": ready_peak,
        "peak_rss_mib": peak,
        **counts,
    }


# -- the benchmark ----------------------------------------------------------------------------


async def publish_all(url: str, messages: int, size: int) -> float:
    """Publish ``messages`` claim-checked messages of ``size`` random bytes; seconds taken."""
    import natsmw

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[SUBJECT])
    claim_check = natsmw.ClaimCheck(threshold=THRESHOLD, bucket=BUCKET)
    began = time.perf_counter()
    for _ in range(messages):
        await natsmw.publish(js, SUBJECT, os.urandom(size), claim_check=claim_check)
    took = time.perf_counter() - began
    info = await js.stream_info(STREAM)
    assert info.state.messages == messages, f"{info.state.messages} messages, not {messages}"
    objects = await js.stream_info(f"OBJ_{BUCKET}")
    print(
        f"  published {messages} x {size} B in {took:.1f} s "
        f"({messages * size / 2**20 / took:.0f} MiB/s); the bucket's stream holds "
        f"{objects.state.bytes / 2**20:.0f} MiB in {objects.state.messages} messages",
        flush=True,
    )
    await nc.close()
    return took


def run_child(kind: str, url: str, messages: int, size: int, durable: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.claim", "--child", kind, "--server", url,
            "--messages", str(messages), "--size", str(size), "--durable", durable]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"bench.claim: variant {kind} failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(messages: int, size: int, rounds: int) -> dict[str, Any]:
    from bench.common import rotated
    from natsmw.server import NatsServer

    load_before = os.getloadavg()[0]
    names = list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with NatsServer() as server:
        published_s = asyncio.run(publish_all(server.url, messages, size))
        for round_ in range(-1, rounds):  # round -1 warms up: the server's caches, the disk
            for name in rotated(names, max(round_, 0), rounds):
                result = run_child(name, server.url, messages, size, f"{name}_{round_ + 1}")
                label = "warm-up" if round_ < 0 else f"round {round_ + 1}"
                print(
                    f"  {label}: {name:16s} {result['wall_s']:7.2f} s  cpu {result['cpu_s']:7.2f}"
                    f" s  peak RSS {result['peak_rss_mib']:7.1f} MiB",
                    flush=True,
                )
                if result["handled"] != messages or result["wrong_size"]:
                    sys.exit(f"bench.claim: variant {name} handled wrong: {result}")
                if round_ >= 0:
                    runs[name].append(result)
    mib = messages * size / 2**20
    variants: dict[str, Any] = {}
    for name in names:
        walls = [r["wall_s"] for r in runs[name]]
        cpus = [r["cpu_s"] for r in runs[name]]
        peaks = [r["peak_rss_mib"] for r in runs[name]]
        wall = statistics.median(walls)
        v: dict[str, Any] = {
            "label": VARIANTS[name],
            "wall_s": wall,
            "wall_s_rounds": walls,
            "ms_per_msg": wall * 1e3 / messages,
            "mib_per_s": mib / wall,
            "cpu_s": statistics.median(cpus),
            "cpu_ms_per_msg": statistics.median(cpus) * 1e3 / messages,
            "peak_rss_mib": statistics.median(peaks),
            "peak_rss_mib_rounds": peaks,
            "rss_ready_mib": statistics.median(r["rss_ready_mib"] for r in runs[name]),
            "rss_growth_mib": statistics.median(
                r["peak_rss_mib"] - r["rss_ready_mib"] for r in runs[name]
            ),
            "redelivered": sum(r["redelivered"] for r in runs[name]),
        }
        for key, of in (("x_plain_time", "wall_s"), ("x_plain_cpu", "cpu_s"),
                        ("x_plain_peak_rss", "peak_rss_mib")):  # fmt: skip
            per_round = [
                mine[of] / theirs[of]
                for mine, theirs in zip(runs[name], runs[BASELINE], strict=True)
            ]
            v[key] = statistics.median(per_round)
            v[f"{key}_range"] = [min(per_round), max(per_round)]
        variants[name] = v
    return {
        "messages": messages,
        "size": size,
        "published_s": published_s,
        "load_average": [load_before, os.getloadavg()[0]],
        "variants": variants,
    }


def show(results: dict[str, Any], rounds: int) -> None:
    n, size = results["messages"], results["size"]
    print(
        f"\nclaim check: {n} messages of {size} B ({size / 2**20:.1f} MiB) by reference, each "
        f"variant a process of its own; median of {rounds} rounds after a warm-up round, the "
        f"order rotating; load average {results['load_average'][0]:.1f} before, "
        f"{results['load_average'][1]:.1f} after"
    )
    print(f"  {'':52s} {'ms/msg':>7s} {'MiB/s':>6s} {'x time':>6s} {'cpu ms':>7s} "
          f"{'x cpu':>6s} {'peak RSS':>9s} {'growth':>7s} {'x RSS':>6s}")  # fmt: skip
    for v in results["variants"].values():
        print(
            f"  {v['label']:52s} {v['ms_per_msg']:7.1f} {v['mib_per_s']:6.1f} "
            f"{v['x_plain_time']:6.2f} {v['cpu_ms_per_msg']:7.1f} {v['x_plain_cpu']:6.2f} "
            f"{v['peak_rss_mib']:5.1f} MiB {v['rss_growth_mib']:7.1f} {v['x_plain_peak_rss']:6.2f}"
        )
    print(
        "  x time, x cpu, x RSS: over plain store.get in the same round (median of the rounds).\n"
        "  growth: peak RSS less the RSS when subscribing (after imports and connecting)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=10 << 20, help="bytes per body")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/claim.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--durable", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size <= THRESHOLD:
        parser.error(f"--size must be over the claim threshold, {THRESHOLD} bytes")
    if args.child:
        result = asyncio.run(child(args.child, args.server, args.messages, args.size, args.durable))
        print(json.dumps(result))
        return
    from bench.common import write_report

    results = run(args.messages, args.size, args.rounds)
    show(results, args.rounds)
    write_report(args.out, "claim check consumer", results, unit="by_variant",
                 messages=args.messages, size=args.size, rounds=args.rounds)  # fmt: skip


if __name__ == "__main__":
    main()
