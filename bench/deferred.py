"""Listing deferred messages (issue 16): ``natsmw deferred list`` on 100,000 of them.

    python -m bench.deferred [--messages 10000 100000] [--rounds 3]

For each size N, on an embedded server of its own, half the messages are *held* and half
*parked*, as natsmw leaves them:

* held: N/2 messages in the stream ``ORDERS``, read by two durable consumers, ``worker`` and
  ``audit``, that never ack (so every sequence is above their ack floor). Each message has
  a record in the deadline bucket ``natsmw_deadlines``, written by natsmw's own
  ``KeyValueDeadlineStore.put`` (which creates the bucket with natsmw's config): the odd
  sequences held by ``worker``, the even ones by ``audit``.
* parked: N/2 schedules in ``natsmw_parked``, stored by natsmw's own ``ParkStream.park``
  (which creates the stream): ``ORDERS/worker`` parked the even sequences of ``ORDERS``
  (``audit`` holds them), and ``SHIPPING/shipper`` (a work-queue stream, emptied by its acks)
  parked the rest. Deadlines are 3 hours ahead: nothing fires during the run.

The writes are many concurrent publishes (a window of ``--window`` at a time). Then every
round runs, in an order that rotates from round to round, each of these as a process of its
own, timed from outside (wall time, from the start of the interpreter to its exit) with its
peak RSS (GNU time's, else ``os.wait4``'s):

* ``natsmw deferred list --json --server URL > /dev/null``: what an operator runs;
* the same with ``--stream ORDERS --consumer worker`` (N/2 of the messages);
* ``natsmw.ops.deferred`` iterated in a process, no output (the library alone);
* raw nats-py, an ordered consumer (push, flow controlled) over ``$KV.natsmw_deadlines.>``:
  the held half only, the fastest plain nats-py way to read a stream;
* raw nats-py reading both halves: that ordered consumer, then ``natsmw.park.>``, where an
  ordered consumer is refused (``natsmw_parked`` is a work-queue stream, whose consumers must
  ack explicitly; the table says what the server answered): either a pull consumer with
  explicit acks that never acks, deleted after, fetching 1,000 at a time, or batched direct
  gets (``$JS.API.DIRECT.GET``, 1,000 messages a request, to a callback subscription);
* raw nats-py, those batched direct gets on both halves, their answers taken by a callback
  subscription, or by ``sub.next_msg()`` one at a time (as natsmw.ops reads them);
* ``natsmw deferred list --help``: the interpreter and natsmw's imports, no server.

The raw readers only count what they read (no decoding). The ratios ("x raw") compare the
time per message with that of the fastest raw reader of both halves in the same round.
Before the rounds, the CLI's output is checked once: every message, by tier and consumer, and
the consumer summary lines; the bench exits with an error, after its table, if that listing
was wrong. Memory is bounded when the CLI's peak RSS at the largest size is about that at the
smallest. Results go to bench/results/deferred.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

from bench.common import rotated, write_report
from natsmw.delay.park import DEFAULT_RETENTION, PARK_STREAM, Parked, ParkStream
from natsmw.delay.stores import DeadlineKey, Deferral, KeyValueDeadlineStore
from natsmw.server import NatsServer

BUCKET = "natsmw_deadlines"
AHEAD = 3 * 3600.0  # deadlines this far ahead: nothing fires during the run
BODY = b"x" * 128

LIST = ["-m", "natsmw", "deferred", "list", "--json"]
FILTER = ["--stream", "ORDERS", "--consumer", "worker"]
# name -> (what it reads: "all", "filter", "held" or "none"; the command after `python`)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "natsmw deferred list --json": ("all", LIST),
    "  --stream ORDERS --consumer worker": ("filter", [*LIST, *FILTER]),
    "natsmw.ops.deferred, no output": ("all", ["-m", "bench.deferred", "--child", "ops"]),
    "raw: ordered consumer, held half": ("held", ["-m", "bench.deferred", "--child", "ordered"]),
    "raw: ordered + pull (no ack)": ("all", ["-m", "bench.deferred", "--child", "pull"]),
    "raw: ordered + direct gets": ("all", ["-m", "bench.deferred", "--child", "ordered-direct"]),
    "raw: direct gets, callback": ("all", ["-m", "bench.deferred", "--child", "direct"]),
    "raw: direct gets, next_msg": ("all", ["-m", "bench.deferred", "--child", "next-msg"]),
    "natsmw deferred list --help": ("none", ["-m", "natsmw", "deferred", "list", "--help"]),
}
HELD_ONLY = "raw: ordered consumer, held half"


# -- filling ---------------------------------------------------------------------------------


async def fill(url: str, messages: int, window: int) -> dict[str, Any]:
    """Store ``messages`` deferred messages, half held, half parked; return what the listing
    must show: counts by (stream, consumer, tier)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    held, parked = messages // 2, messages - messages // 2
    began = time.perf_counter()
    await js.add_stream(name="ORDERS", subjects=["orders.>"])
    await js.add_stream(
        name="SHIPPING", subjects=["shipping.>"], retention=RetentionPolicy.WORK_QUEUE
    )
    stored = time.time()
    acks = []
    for i in range(held):
        acks.append(await js.publish_async("orders.new", BODY, headers={"X-Order": str(i)}))
    await js.publish_async_completed()
    assert all(ack.result().seq == i + 1 for i, ack in enumerate(acks)), "ORDERS sequences"
    del acks
    created: dict[str, float] = {}
    for stream, durable in (("ORDERS", "worker"), ("ORDERS", "audit"), ("SHIPPING", "shipper")):
        info = await js.add_consumer(
            stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT)
        )
        created[durable] = info.created.timestamp() if info.created else time.time()
    published = time.perf_counter() - began

    expected: Counter[tuple[str, str, str]] = Counter()
    now = time.time()

    def trace(i: int) -> str:
        return f"00-{i:032x}-{i:016x}-01"

    store = KeyValueDeadlineStore(js)
    puts = []
    for seq in range(1, held + 1):
        consumer = "worker" if seq % 2 else "audit"
        deferral = Deferral(
            deadline=now + AHEAD + seq * 0.01,
            deferred_at=1,
            requested=AHEAD,
            stored_at=stored + seq * 1e-6,
            traceparent=trace(seq),
            consumer_created=created[consumer],
            subject="orders.new",
        )
        puts.append(store.put(DeadlineKey("ORDERS", consumer, seq), deferral))
        expected["ORDERS", consumer, "held"] += 1
    await _in_windows(puts, window)
    kv_done = time.perf_counter() - began

    parks = ParkStream(nc, retention=DEFAULT_RETENTION)
    schedules = []
    owners = [("ORDERS", "worker", seq) for seq in range(2, held + 1, 2)]
    owners += [("SHIPPING", "shipper", seq) for seq in range(1, parked - len(owners) + 1)]
    for i, (stream, consumer, seq) in enumerate(owners):
        record = Parked(
            stream=stream,
            consumer=consumer,
            sequence=seq,
            subject="orders.new" if stream == "ORDERS" else "shipping.label",
            deadline=now + AHEAD + i * 0.01,
            calls=1,
            delivered=1,
            stored_at=stored + seq * 1e-6,
            requested=AHEAD,
            traceparent=trace(held + i + 1),
        )
        schedules.append(parks.park(record, BODY, {"X-Order": str(seq)}))
        expected[stream, consumer, "parked"] += 1
    await _in_windows(schedules, window)
    took = time.perf_counter() - began

    kv = await js.stream_info(f"KV_{BUCKET}")
    park = await js.stream_info(PARK_STREAM, subjects_filter="natsmw.park.>")
    schedules_stored = sum((park.state.subjects or {}).values())
    # natsmw's clock probe (natsmw.park.clock) is in natsmw_parked too, and not deferred
    assert kv.state.messages == held, f"{kv.state.messages} records stored, not {held}"
    assert schedules_stored >= parked, f"{schedules_stored} schedules stored, not {parked}"
    await nc.close()
    print(
        f"  filled in {took:.1f} s: {held} messages in ORDERS in {published:.1f} s, their "
        f"records in {kv_done - published:.1f} s, {parked} schedules in {took - kv_done:.1f} s"
        f" ({kv.state.bytes / held:.0f} B per record, {park.state.bytes / parked:.0f} B per "
        f"schedule on the server)",
        flush=True,
    )
    return {
        "expected": expected,
        "fill_s": took,
        "kv_bytes": kv.state.bytes,
        "park_bytes": park.state.bytes,
        "park_stream_messages": schedules_stored,
    }


async def _in_windows(calls: list[Any], window: int) -> None:
    """Await ``calls`` (coroutines), ``window`` of them in flight at a time."""
    for start in range(0, len(calls), window):
        await asyncio.gather(*calls[start : start + window])


# -- the raw readers and the library, each in a process of its own (--child) ----------------


async def child(kind: str, url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    began = time.perf_counter()
    if kind == "ops":
        from natsmw import ops

        counts: Counter[str] = Counter()
        async for message in ops.deferred(nc):
            counts[message.tier] += 1
        result: dict[str, Any] = dict(counts)
    elif kind == "ordered":
        result = {"held": await read_ordered(nc, f"$KV.{BUCKET}.>")}
    elif kind == "pull":
        result = {
            "held": await read_ordered(nc, f"$KV.{BUCKET}.>"),
            "parked": await read_pulled(nc, PARK_STREAM, "natsmw.park.>"),
        }
    elif kind == "ordered-direct":
        result = {
            "held": await read_ordered(nc, f"$KV.{BUCKET}.>"),
            "parked": await read_direct(nc, PARK_STREAM, "natsmw.park.>"),
        }
    elif kind in ("direct", "next-msg"):
        read = read_direct if kind == "direct" else read_direct_next_msg
        result = {
            "held": await read(nc, f"KV_{BUCKET}", f"$KV.{BUCKET}.>"),
            "parked": await read(nc, PARK_STREAM, "natsmw.park.>"),
        }
    elif kind == "ordered-parked":  # only to show that the server refuses it
        result = {"parked": await read_ordered(nc, "natsmw.park.>")}
    else:
        raise SystemExit(f"no child {kind!r}")
    result["seconds"] = time.perf_counter() - began
    await nc.close()
    return result


async def read_ordered(nc: Client, subject: str) -> int:
    """Every message on ``subject`` through an ordered consumer; how many."""
    js = nc.jetstream()
    info = await js.stream_info(await js.find_stream_name_by_subject(subject))
    if not info.state.messages:
        return 0
    done = asyncio.Event()
    seen = 0

    async def count(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subject, ordered_consumer=True, cb=count, pending_msgs_limit=-1, pending_bytes_limit=-1
    )
    await asyncio.wait_for(done.wait(), 600)
    await sub.unsubscribe()
    return seen


async def read_pulled(nc: Client, stream: str, subject: str) -> int:
    """Every message on ``subject`` through a pull consumer that never acks (the only plain
    consumer a work-queue stream allows), deleted after; how many."""
    js = nc.jetstream()
    durable = f"bench_raw_{os.getpid()}"
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=600,
        max_ack_pending=-1,
    )
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
    seen = 0
    try:
        while True:
            batch = await sub.fetch(1000, timeout=5)
            seen += len(batch)
            if batch[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(stream, durable)
    return seen


async def read_direct(nc: Client, stream: str, subject: str) -> int:
    """Every message on ``subject``, by batched direct gets (1,000 a request) answered to a
    callback subscription; how many."""
    inbox = nc.new_inbox()
    answered = asyncio.Event()
    seen, sequence, finished = 0, 1, False

    async def take(msg: Msg) -> None:
        nonlocal seen, sequence, finished
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            seen += 1
            sequence = int(headers["Nats-Sequence"]) + 1
            return
        if status == "404" or headers.get("Nats-Num-Pending") == "0":
            finished = True
        elif status != "204":
            raise RuntimeError(f"direct get of {stream}: {headers}")
        answered.set()

    sub = await nc.subscribe(inbox, cb=take, pending_msgs_limit=-1, pending_bytes_limit=-1)
    try:
        while not finished:
            answered.clear()
            request = {"seq": sequence, "next_by_subj": subject, "batch": 1000}
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(),
                             reply=inbox)  # fmt: skip
            await asyncio.wait_for(answered.wait(), 10)
    finally:
        await sub.unsubscribe()
    return seen


async def read_direct_next_msg(nc: Client, stream: str, subject: str) -> int:
    """The same direct gets, read with ``sub.next_msg()`` one message at a time (as
    natsmw.ops reads them); how many."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    seen, sequence = 0, 1
    try:
        while True:
            request = {"seq": sequence, "next_by_subj": subject, "batch": 1000}
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(),
                             reply=inbox)  # fmt: skip
            while True:
                msg = await sub.next_msg(timeout=10)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404":
                    return seen
                if status == "204":
                    if headers.get("Nats-Num-Pending") == "0":
                        return seen
                    break
                if status is not None:
                    raise RuntimeError(f"direct get of {stream}: {headers}")
                seen += 1
                sequence = int(headers["Nats-Sequence"]) + 1
    finally:
        await sub.unsubscribe()


# -- measuring ---------------------------------------------------------------------------------


GNU_TIME = "/usr/bin/time"


def timed(command: list[str], url: str) -> tuple[float, float, str]:
    """Run ``python <command> --server URL``, its output to /dev/null unless it is a child of
    this bench; return its wall time (s), peak RSS (MB) and what it printed.

    The peak RSS is GNU time's (``%M``): a process forked from this one would count this
    one's RSS at the fork as its own peak (Linux keeps the high-water mark across exec), so
    ``os.wait4``'s is used only when there is no /usr/bin/time.
    """
    argv = [sys.executable, *command, "--server", url]
    ours = "bench.deferred" in command
    env = {**os.environ, "NATS_URL": ""}
    gnu_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as peak:
        if gnu_time:
            argv = [GNU_TIME, "-f", "%M", "-o", peak.name, *argv]
        sink = out if ours else subprocess.DEVNULL
        began = time.perf_counter()
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.stderr is not None
        errors = process.stderr.read().decode(errors="replace")
        process.stderr.close()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}: {errors[-2000:]}")
        out.seek(0)
        printed = out.read().decode()
        kib = int(peak.read().split()[-1]) if gnu_time else usage.ru_maxrss  # KiB on Linux
    return wall, kib / 1024, printed


def check_listing(url: str, expected: Counter[tuple[str, str, str]]) -> dict[str, Any]:
    """Run the CLI once with its output kept; compare what it lists with what was stored."""
    found: dict[str, Any] = {}
    for name, options in (("all", []), ("filter", FILTER)):
        argv = [sys.executable, "-m", "natsmw", "deferred", "list", "--json", *options]
        with tempfile.TemporaryFile("w+") as out:
            subprocess.run([*argv, "--server", url], stdout=out, check=True,
                           env={**os.environ, "NATS_URL": ""})  # fmt: skip
            out.seek(0)
            messages: Counter[tuple[str, str, str]] = Counter()
            summaries: dict[tuple[str, str], dict[str, int]] = {}
            sequences: set[tuple[str, str, int]] = set()
            for line in out:
                row = json.loads(line)
                if row["type"] == "message":
                    messages[row["stream"], row["consumer"], row["tier"]] += 1
                    sequences.add((row["stream"], row["consumer"], row["sequence"]))
                else:
                    summaries[row["stream"], row["consumer"]] = {
                        tier: row[tier] for tier in ("held", "parked", "due")
                    }
        want = +Counter(
            {k: v for k, v in expected.items() if name == "all" or k[:2] == ("ORDERS", "worker")}
        )
        summed: Counter[tuple[str, str, str]] = Counter()
        for (stream, consumer), tiers in summaries.items():
            for tier, count in tiers.items():
                summed[stream, consumer, tier] += count
        problems = []
        if messages != want:
            problems.append(f"messages listed {dict(messages)}, stored {dict(want)}")
        if +summed != want:
            problems.append(f"consumer lines {dict(+summed)}, stored {dict(want)}")
        if len(sequences) != sum(messages.values()):
            problems.append(f"{sum(messages.values()) - len(sequences)} messages listed twice")
        found[name] = {"listed": sum(messages.values()), "problems": problems}
        for problem in problems:
            print(f"  NATSMW LISTING WRONG ({name}): {problem}", flush=True)
    return found


def reads(kind: str, expected: Counter[tuple[str, str, str]]) -> int:
    if kind == "all":
        return sum(expected.values())
    if kind == "filter":
        return sum(v for k, v in expected.items() if k[:2] == ("ORDERS", "worker"))
    if kind == "held":
        return sum(v for k, v in expected.items() if k[2] == "held")
    return 0


def run_size(messages: int, rounds: int, window: int) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    with NatsServer() as server:
        filled = asyncio.run(fill(server.url, messages, window))
        expected: Counter[tuple[str, str, str]] = filled["expected"]
        checked = check_listing(server.url, expected)
        refused = ordered_on_work_queue(server.url)
        names = list(VARIANTS)
        walls: dict[str, list[float]] = {name: [] for name in names}
        rss: dict[str, list[float]] = {name: [] for name in names}
        counted: dict[str, Any] = {}
        for round_ in range(-1, rounds):  # round -1 warms up (the server's caches, the disk)
            for name in rotated(names, max(round_, 0), rounds):
                kind, command = VARIANTS[name]
                wall, peak, printed = timed(command, server.url)
                if printed:
                    counted[name] = {k: v for k, v in json.loads(printed).items() if k != "seconds"}
                if round_ >= 0:
                    walls[name].append(wall)
                    rss[name].append(peak)
    results: dict[str, Any] = {
        "messages": messages,
        "fill_s": filled["fill_s"],
        "server_bytes_per_record": filled["kv_bytes"] / max(messages // 2, 1),
        "server_bytes_per_schedule": filled["park_bytes"] / max(messages - messages // 2, 1),
        "listing_checked": checked,
        # other processes on the machine: the 1-minute load average before and after
        "load_average": [load_before, os.getloadavg()[0]],
        "ordered_consumer_on_natsmw_parked": refused,
        "counted_by_children": counted,
        "variants": {},
    }
    startup = statistics.median(walls["natsmw deferred list --help"])
    for name in names:
        kind = VARIANTS[name][0]
        read = reads(kind, expected)
        wall = statistics.median(walls[name])
        results["variants"][name] = {
            "reads": read,
            "wall_s": wall,
            "wall_s_rounds": walls[name],
            "msg_per_s": read / wall if read else None,
            "us_per_msg_after_startup": (wall - startup) * 1e6 / read if read else None,
            "peak_rss_mb": max(rss[name]),
        }
    # The baseline: the fastest raw reader of both halves (by median); ratios are the median
    # of the ratios of each round, against the baseline's time in the same round.
    raw_all = [n for n in names if n.startswith("raw") and VARIANTS[n][0] == "all"]
    baseline = min(raw_all, key=lambda n: results["variants"][n]["wall_s"])
    results["baseline"] = baseline
    for name in names:
        v = results["variants"][name]
        for base, key in ((baseline, "x_raw_time"), (HELD_ONLY, "x_raw_held_rate")):
            if not v["reads"]:
                continue
            per_round = [
                (mine / v["reads"]) / (theirs / results["variants"][base]["reads"])
                for mine, theirs in zip(walls[name], walls[base], strict=True)
            ]
            v[key] = statistics.median(per_round)  # time per message over the baseline's
            v[f"{key}_range"] = [min(per_round), max(per_round)]
    for name, count in counted.items():
        want = reads(VARIANTS[name][0], expected)
        got = sum(count.values())
        # natsmw's clock probe (natsmw.park.clock) is one more message for the raw readers
        if not want <= got <= want + 1:
            print(f"  {name.strip()}: read {got} messages, {want} stored", flush=True)
    return results


def ordered_on_work_queue(url: str) -> str:
    """What the server says to an ordered consumer on ``natsmw_parked``."""
    argv = [sys.executable, "-m", "bench.deferred", "--child", "ordered-parked", "--server", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return f"accepted: {done.stdout.strip()}"
    last = [line for line in done.stderr.splitlines() if line.strip()]
    return f"refused: {last[-1] if last else done.returncode}"


def show(all_results: list[dict[str, Any]], rounds: int) -> None:
    for results in all_results:
        n = results["messages"]
        print(
            f"\ndeferred list: {n} deferred messages ({n // 2} held, {n - n // 2} parked); "
            f"each reader a process of its own, timed from outside (interpreter start "
            f"included); median (min-max) of {rounds} rounds after a warm-up round; load "
            f"average {results['load_average'][0]:.1f} before, {results['load_average'][1]:.1f} "
            f"after"
        )
        print(f"  {'':36s} {'reads':>6s} {'wall s':>6s} {'(min-max)':>13s} {'msg/s':>6s} "
              f"{'us/msg':>6s} {'x raw':>14s} {'x held':>6s} {'peak RSS':>9s}")  # fmt: skip
        for name, v in results["variants"].items():
            walls = v["wall_s_rounds"]
            cells = [f"  {name:36s} {v['reads']:6d} {v['wall_s']:6.2f} "
                     f"({min(walls):5.2f}-{max(walls):5.2f})"]  # fmt: skip
            if v["reads"]:
                low, high = v["x_raw_time_range"]
                cells.append(f"{v['msg_per_s']:6.0f} {v['us_per_msg_after_startup']:6.1f} "
                             f"{v['x_raw_time']:5.2f} ({low:.2f}-{high:.2f}) "
                             f"{v['x_raw_held_rate']:6.2f}")  # fmt: skip
            else:
                cells.append(f"{'':42s}")
            cells.append(f"{v['peak_rss_mb']:6.1f} MB")
            print(" ".join(cells))
        print(
            f"  us/msg: wall time less the median of `--help`'s, per message read.\n"
            f"  x raw: time per message over that of the fastest raw reader of both halves,\n"
            f"  {results['baseline']!r}, in the same round (median, min-max of rounds).\n"
            f"  x held: the same against {HELD_ONLY!r} (the deadline bucket only).\n"
            f"  ordered consumer on {PARK_STREAM}: {results['ordered_consumer_on_natsmw_parked']}"
        )
        for which, check in results["listing_checked"].items():
            verdict = "; ".join(check["problems"]) or "every message, right"
            print(f"  CLI output checked ({which}): {check['listed']} listed, {verdict}")
    if len(all_results) > 1:
        small, large = all_results[0], all_results[-1]
        print(f"\npeak RSS, {small['messages']} vs {large['messages']} messages:")
        for name in small["variants"]:
            a = small["variants"][name]["peak_rss_mb"]
            b = large["variants"][name]["peak_rss_mb"]
            print(f"  {name:36s} {a:6.1f} MB {b:6.1f} MB  ({b - a:+.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--messages", type=int, nargs="+", default=[10_000, 100_000],
        help="sizes, each on a server of its own (peak RSS compared: first and last)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000, help="writes in flight at once")
    parser.add_argument("--out", type=Path, default=Path("bench/results/deferred.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.server))))
        return
    all_results = []
    for messages in args.messages:
        print(f"== {messages} deferred messages", flush=True)
        all_results.append(run_size(messages, args.rounds, args.window))
    show(all_results, args.rounds)
    write_report(args.out, "natsmw deferred list", all_results, unit="by_size",
                 messages=args.messages, rounds=args.rounds)  # fmt: skip
    wrong = [
        f"{results['messages']} messages, {which}: {problem}"
        for results in all_results
        for which, check in results["listing_checked"].items()
        for problem in check["problems"]
    ]
    if wrong:
        sys.exit("natsmw deferred list listed wrong:\n  " + "\n  ".join(wrong))


if __name__ == "__main__":
    main()
