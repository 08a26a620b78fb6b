"""The seed scenario of the park tier, park against hold, in one run on one embedded server.

    python -m bench.park [--messages 100000] [--delay 300] [--cap 30] [--serve-concurrency N]

``messages`` stored messages (5 headers each, as in bench.soak) are each deferred once by
their handler for ``delay`` seconds, under ``with_delay_cap(cap)``, and acked when the handler
is called again. Two consumer processes of their own, one after the other, on two durable
consumers of the same stream: tier "park" (``with_delay_cap(cap)`` + ``serve_parked``: the
messages wait in the server's scheduler, in ``natsmw_parked``) and then tier "hold"
(``with_delay_cap(cap, parking=False)``: naks of at most ``cap`` until the deadline). The park
tier runs first so that the server's RSS while it waits is not the hold tier's left-overs.

For each tier: holds per second while the messages wait, deliveries per message, the
consumer's ack-pending, the consumer process's RSS and the server's while they wait, the
server's and the consumer's CPU per message, the server storage per deferred message
(``natsmw_parked`` for park, the deadline bucket for hold), the messages the consumer process
sends to the server per message (counted on the wire by a spy subscription, by kind, and
cross-checked against the server's ``in_msgs`` for that connection), the lateness of the
second call against the deadline the handler asked for, and lost and early calls (both must
be 0). A message not called again by the end (the tier stops once nothing has come for a
while after the last deadline, and at the latest delay / 2 after it) counts as lost, and as
late until the end in the lateness, which is then a lower bound; the table says how many of
them still wait in ``natsmw_parked``. ``--serve-concurrency`` passes ``concurrency`` to
``serve_parked``. The report records a digest of natsmw/delay as it was on disk.

The seed scenario of the issue is 100,000 messages deferred 600 s. The tiers run one after
the other (each waits the whole delay: 600 s each would take about 24 minutes in all), so the
default delay is 300 s, which keeps the full run near 14 minutes on a 2-core machine; the
hold tier's deliveries per message grow with the delay (about delay / cap), the park tier's
do not. ``--delay 600`` runs the seed scenario as it is. Results go to bench/results/park.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from bench.common import write_report
from bench.soak import server_rss_mb
from natsmw.delay import PARK_STREAM
from natsmw.delay.park import due_consumer_name
from natsmw.server import NatsServer

STREAM = "SEED"
TIERS = ("park", "hold")
BUCKET = "KV_natsmw_deadlines"
SPIED = ("$JS.API.>", "$JS.ACK.>", "$KV.>", "natsmw.park.>")


class Spy:
    """Counts, by kind, what clients send to the server: JetStream API requests (fetches
    among them), acks and naks, key-value puts and park schedules."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def see(self, msg: Msg) -> None:
        subject = msg.subject
        if subject.startswith("$JS.ACK."):
            parked = ".natsmw_parked." in subject
            data = msg.data
            kind = "nak" if data.startswith(b"-NAK") else "term" if data.startswith(b"+TERM") \
                else "progress" if data.startswith(b"+WPI") else "ack"  # fmt: skip
            self.counts[f"{kind} (due copy)" if parked else kind] += 1
        elif subject.startswith("natsmw.park."):
            self.counts["schedule publish"] += 1
        elif subject.startswith("$KV."):
            self.counts["deadline put"] += 1
        elif subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            parked = subject.startswith(f"$JS.API.CONSUMER.MSG.NEXT.{PARK_STREAM}.")
            self.counts["fetch (due)" if parked else "fetch"] += 1
        elif subject.startswith("$JS.API."):
            # $JS.API.STREAM.INFO.<stream>, $JS.API.DIRECT.GET.<stream>...: the verb, no names
            verb = ".".join(token for token in subject.split(".")[2:4] if token.isupper())
            self.counts[f"API {verb}"] += 1
        else:
            self.counts["other"] += 1


def monitor(server: NatsServer, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def jetstream_state(server: NatsServer, durable: str) -> dict[str, float]:
    """What the server says of the stream, the consumers and natsmw's streams, now."""
    jsz = monitor(server, "/jsz?accounts=true&streams=true&consumers=true")
    due = due_consumer_name(STREAM, durable)
    state: dict[str, float] = {"t": time.time()}
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            name = stream["name"]
            if name in (PARK_STREAM, BUCKET):
                state[f"{name}.messages"] = stream["state"]["messages"]
                state[f"{name}.bytes"] = stream["state"]["bytes"]
            for consumer in stream.get("consumer_detail") or []:
                if (name, consumer["name"]) in ((STREAM, durable), (PARK_STREAM, due)):
                    which = "consumer" if name == STREAM else "due_consumer"
                    state[f"{which}.ack_pending"] = consumer["num_ack_pending"]
                    state[f"{which}.delivered"] = consumer["delivered"]["consumer_seq"]
                    state[f"{which}.redelivered"] = consumer["num_redelivered"]
                    state[f"{which}.pending"] = consumer["num_pending"]
    state["server_rss_mb"] = server_rss_mb(server_pid(server))
    state["server_cpu_s"] = cpu_seconds(server_pid(server))
    return state


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(server: NatsServer) -> int:
    assert server._process is not None
    return server._process.pid


def in_msgs(server: NatsServer, name: str) -> int | None:
    """Messages the connection named ``name`` sent to the server (its last one, open or closed)."""
    connz = monitor(server, "/connz?state=all&limit=10000")
    found = [c["in_msgs"] for c in connz.get("connections") or [] if c.get("name") == name]
    return found[-1] if found else None


def within(samples: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    return [s for s in samples if start <= s["t"] <= end]


async def run_tier(
    server: NatsServer,
    spy: Spy,
    tier: str,
    messages: int,
    delay: float,
    cap: float,
    serving: dict[str, Any],
) -> dict[str, Any]:
    durable = tier
    every = min(5.0, max(delay / 10, 0.25))  # server sampling interval
    # Once the last deadline has passed: stop when nothing more came for `stall` seconds, and
    # at the latest `grace` seconds after it; what was not called again by then is missing.
    stall = min(max(5.0, 0.1 * delay), 30.0)
    grace = max(30.0, 0.5 * delay)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.park_consumer", server.url, tier, str(cap), str(delay),
        str(messages), durable, json.dumps(serving),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdin is not None
    started = time.time()
    samples: list[dict[str, Any]] = []
    states: list[dict[str, float]] = []
    all_deferred: float | None = None
    done, progressed = 0, started
    final: dict[str, Any] = {}
    exit_status = "clean"

    async def sample_server() -> None:
        while True:
            states.append(await asyncio.to_thread(jetstream_state, server, durable))
            await asyncio.sleep(every)

    sampler = asyncio.create_task(sample_server())
    try:
        async for line in child.stdout:
            sample = json.loads(line)
            samples.append(sample)
            now = sample["t"]
            if sample["done"] != done:
                done, progressed = sample["done"], now
            if all_deferred is None and sample["first"] >= messages:
                all_deferred = now
                print(f"  {tier}: all {messages} deferred after {now - started:.1f}s "
                      f"(parked {sample['parked']}, fallbacks {sample['park_fallbacks']})",
                      flush=True)  # fmt: skip
            if len(samples) % 30 == 0 or done >= messages:
                print(f"  {tier}: t={now - started:5.0f}s deferred={sample['first']} "
                      f"done={done} holds={sample['holds']} parked={sample['parked']} "
                      f"unparked={sample['unparked']} client={sample['rss_mb']:.1f} MB",
                      flush=True)  # fmt: skip
            if done >= messages and now >= progressed + 2:  # a moment for duplicates to show
                break
            last_deadline = sample["last_deadline"] if all_deferred is not None else math.inf
            if now > last_deadline + grace or (
                now > last_deadline + stall and now > progressed + stall
            ):
                print(f"  {tier}: stopping {now - last_deadline:.0f}s after the last deadline: "
                      f"{messages - done} not called again", flush=True)  # fmt: skip
                break
            if all_deferred is None and now > started + delay + grace + 600:
                print(f"  {tier}: stopping: not all deferred after {now - started:.0f}s",
                      flush=True)  # fmt: skip
                break
        child.stdin.close()
        while not final:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            if not line:
                break
            final = json.loads(line) if b'"final"' in line else final
        try:
            await asyncio.wait_for(child.wait(), 60)
        except asyncio.TimeoutError:
            exit_status = "killed: did not exit within 60 s of its last report"
    finally:
        sampler.cancel()
        if child.returncode is None:
            child.kill()
            await child.wait()
    ended = await asyncio.to_thread(jetstream_state, server, durable)
    sent = await asyncio.to_thread(in_msgs, server, f"bench-park-{tier}")
    result = summarise(tier, messages, samples, states, final, ended, sent, all_deferred, spy)
    result["consumer_exit"] = exit_status
    return result


def summarise(
    tier: str,
    messages: int,
    samples: list[dict[str, Any]],
    states: list[dict[str, float]],
    final: dict[str, Any],
    ended: dict[str, float],
    sent: int | None,
    all_deferred: float | None,
    spy: Spy,
) -> dict[str, Any]:
    """The figures of one tier. "While deferred": from the moment every message has been
    deferred to the first deadline."""
    first_deadline = final.get("first_deadline", math.inf)
    start = all_deferred if all_deferred is not None else math.inf
    waiting = within(samples, start, first_deadline)
    waiting_server = within(states, start, first_deadline)
    if len(waiting) >= 2:
        span = waiting[-1]["t"] - waiting[0]["t"]
        holds_per_s = (waiting[-1]["holds"] - waiting[0]["holds"]) / span if span else math.nan
    else:
        holds_per_s = math.nan

    def peak(rows: list[dict[str, Any]], key: str) -> float:
        values = [row[key] for row in rows if key in row]
        return max(values) if values else math.nan

    def middle(rows: list[dict[str, Any]], key: str) -> float:
        values = [row[key] for row in rows if key in row]
        return statistics.median(values) if values else math.nan

    deferred = final.get("first", 0)
    if tier == "park":
        stored = middle(waiting_server, f"{PARK_STREAM}.bytes")
        per_message = stored / max(final.get("parked", 0), 1)
    else:
        stored = middle(waiting_server, f"{BUCKET}.bytes")
        per_message = stored / max(deferred, 1)
    delivered = ended.get("consumer.delivered", 0) + ended.get("due_consumer.delivered", 0)
    server_cpu = ended["server_cpu_s"] - states[0]["server_cpu_s"] if states else math.nan
    client_cpu = final.get("cpu_s", math.nan)
    ops = dict(sorted(spy.counts.items()))
    total_ops = sum(ops.values())
    lateness = final.get("lateness_s", {})
    return {
        "holds_per_s_waiting": holds_per_s,
        "holds": final.get("holds"),
        "deliveries_per_message_handler": final.get("deliveries_per_message", {}).get("mean"),
        "deliveries_per_message_max": final.get("deliveries_per_message", {}).get("max"),
        "deliveries_per_message_server": delivered / messages,
        "ack_pending_waiting_max": peak(waiting_server, "consumer.ack_pending"),
        "due_ack_pending_waiting_max": peak(waiting_server, "due_consumer.ack_pending"),
        "client_rss_mb_waiting_max": peak(waiting, "rss_mb"),
        "client_rss_mb_start": samples[0]["rss_mb"] if samples else math.nan,
        "server_rss_mb_waiting_max": peak(waiting_server, "server_rss_mb"),
        "server_cpu_ms_per_message": server_cpu * 1000 / messages,
        "client_cpu_ms_per_message": client_cpu * 1000 / messages,
        "storage_bytes_waiting": stored,
        "storage_bytes_per_message": per_message,
        "ops_per_message": total_ops / messages,
        "writes_per_message": sum(
            count for kind, count in ops.items() if not kind.startswith(("fetch", "API"))
        )
        / messages,
        "pulls_and_api_per_message": sum(
            count for kind, count in ops.items() if kind.startswith(("fetch", "API"))
        )
        / messages,
        "ops_by_kind": ops,
        "in_msgs_per_message": None if sent is None else sent / messages,
        "lateness_p50_s": lateness.get("p50"),
        "lateness_p99_s": lateness.get("p99"),
        "lateness_max_s": lateness.get("max"),
        "lateness_min_s": lateness.get("min"),
        "lost": messages - final.get("done", 0),
        "early": final.get("early"),
        "called_again_after_ack": final.get("extra"),
        "parked": final.get("parked"),
        "unparked": final.get("unparked"),
        "park_fallbacks": final.get("park_fallbacks"),
        "lateness_is_lower_bound": lateness.get("lower_bound", True),
        "park_stream_left": {
            "messages": ended.get(f"{PARK_STREAM}.messages"),
            "bytes": ended.get(f"{PARK_STREAM}.bytes"),
            "due_copies_waiting": ended.get("due_consumer.pending", 0)
            + ended.get("due_consumer.ack_pending", 0),
        },
        "consumer_ack_pending_end": ended.get("consumer.ack_pending"),
        "waiting_window_s": (waiting[-1]["t"] - waiting[0]["t"]) if len(waiting) >= 2 else 0.0,
        "samples": samples,
        "server_samples": states,
    }


async def run(messages: int, delay: float, cap: float, serving: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with NatsServer() as server:
        nc = await nats.connect(server.url, name="bench-park-driver")
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["seed.>"])
        for i in range(messages):
            headers = {f"X-Header-{h}": f"value-{h}-{i}" for h in range(4)}
            headers["Nats-Msg-Id"] = f"seed-{i}"
            await nc.publish("seed.job", b"x" * 256, headers=headers)
            if i % 10_000 == 0:
                await nc.flush()
        await nc.flush()
        spy = Spy()
        for subject in SPIED:
            await nc.subscribe(subject, cb=spy.see, pending_msgs_limit=-1, pending_bytes_limit=-1)
        for tier in TIERS:
            await js.add_consumer(STREAM, ConsumerConfig(
                durable_name=tier, ack_wait=cap * 6, max_ack_pending=-1))  # fmt: skip
            await nc.flush()
            await asyncio.sleep(0.2)  # the spy has seen the driver's own request
            spy.counts.clear()
            results[tier] = await run_tier(server, spy, tier, messages, delay, cap, serving)
            await nc.flush()
        await nc.close()
    return results


ROWS = (
    # (label, key, format, park target)
    ("holds per second while waiting", "holds_per_s_waiting", "{:.1f}", "0"),
    ("deliveries per message (handler's view)", "deliveries_per_message_handler", "{:.2f}", ""),
    ("deliveries per message (server's count)", "deliveries_per_message_server", "{:.2f}", ""),
    ("consumer ack-pending while waiting (max)", "ack_pending_waiting_max", "{:.0f}", "0"),
    ("client RSS while waiting, MB (max)", "client_rss_mb_waiting_max", "{:.1f}", ""),
    ("server RSS while waiting, MB (max)", "server_rss_mb_waiting_max", "{:.1f}", ""),
    ("server CPU per message, ms (whole tier)", "server_cpu_ms_per_message", "{:.3f}", ""),
    ("client CPU per message, ms (whole tier)", "client_cpu_ms_per_message", "{:.3f}", ""),
    ("server storage per deferred message, B", "storage_bytes_per_message", "{:.0f}", ""),
    ("server operations per message", "ops_per_message", "{:.3f}", "<= 3"),
    ("  of them acks, naks, schedules, KV puts", "writes_per_message", "{:.3f}", ""),
    ("  of them pulls and API requests", "pulls_and_api_per_message", "{:.3f}", ""),
    ("  cross-check: server's in_msgs per message", "in_msgs_per_message", "{:.3f}", ""),
    ("lateness p50, s", "lateness_p50_s", "{:.3f}", ""),
    ("lateness p99, s", "lateness_p99_s", "{:.3f}", "< 1.5"),
    ("lateness max, s", "lateness_max_s", "{:.3f}", ""),
    ("lost (not called again by the end)", "lost", "{}", "0"),
    ("early", "early", "{}", "0"),
    ("called again after the ack", "called_again_after_ack", "{}", "0"),
    ("park fallbacks", "park_fallbacks", "{}", "0"),
)


def show(results: dict[str, Any], messages: int, delay: float, cap: float) -> None:
    print(f"\npark vs hold: {messages} messages, each deferred {delay:.0f} s once, cap {cap:g} s")
    print(f"  {'':44s} {'hold':>12s} {'park':>12s}   park target")
    for label, key, form, target in ROWS:
        cells = []
        for tier in ("hold", "park"):
            value = results[tier].get(key)
            cells.append("n/a" if value is None else form.format(value))
        print(f"  {label:44s} {cells[0]:>12s} {cells[1]:>12s}   {target}")
    for tier in ("hold", "park"):
        ops = results[tier]["ops_by_kind"]
        kinds = ", ".join(f"{kind} {count / messages:.3f}" for kind, count in ops.items())
        print(f"  {tier} operations per message by kind: {kinds}")
    left = results["park"]["park_stream_left"]
    print(f"  {PARK_STREAM} after the park tier: {left['messages']} messages, {left['bytes']} B, "
          f"{left['due_copies_waiting']} of them due copies not yet acked")  # fmt: skip
    for tier in ("hold", "park"):
        result = results[tier]
        if result["lateness_is_lower_bound"]:
            print(f"  {tier}: lateness counts the messages not called again as late until the "
                  f"end: lower bounds")  # fmt: skip
        if result["consumer_exit"] != "clean":
            print(f"  {tier}: the consumer process was {result['consumer_exit']}")


def code_digest() -> str:
    """The commit, and a digest of natsmw/delay as it is on disk: what was measured."""
    delay = Path(__file__).resolve().parent.parent / "natsmw" / "delay"
    digest = hashlib.sha256()
    for source in sorted(delay.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=delay, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True,
                           text=True, cwd=delay).stdout.strip()  # fmt: skip
    return f"{commit}{'+changes' if dirty else ''} natsmw/delay sha256:{digest.hexdigest()[:12]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--delay", type=float, default=300.0)
    parser.add_argument("--cap", type=float, default=30.0)
    parser.add_argument(
        "--serve-concurrency", type=int, default=None, metavar="N",
        help="serve_parked(concurrency=N) for the park tier; by default serve_parked's own",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/park.json"))
    args = parser.parse_args()
    if args.delay <= args.cap:
        parser.error("--delay must be longer than --cap, or nothing is held or parked")
    serving = {} if args.serve_concurrency is None else {"concurrency": args.serve_concurrency}
    code = code_digest()
    results = asyncio.run(run(args.messages, args.delay, args.cap, serving))
    if code_digest() != code:
        print(f"\nnatsmw/delay changed on disk during the run (was {code}, is {code_digest()}): "
              f"the consumer processes ran whichever was there when they started")  # fmt: skip
        code = f"{code}, then {code_digest()}"
    show(results, args.messages, args.delay, args.cap)
    settings = {"messages": args.messages, "delay": args.delay, "cap": args.cap,
                "serve_parked_options": serving, "natsmw_delay_code": code}  # fmt: skip
    write_report(args.out, "park tier vs hold tier (seed scenario)", results, unit="by_tier",
                 **settings)  # fmt: skip


if __name__ == "__main__":
    main()
