"""``python -m natsmw demo``: natsmw at work on real messages, against an embedded server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import nats
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from natsmw.chain import Handler, Middleware, compose, middleware
from natsmw.delay import handler_calls, with_delay_cap
from natsmw.message import MessageProxy, Settle, Settlement
from natsmw.server import NatsServer
from natsmw.tracing import with_tracing

CAP = 0.25  # seconds: stands in for a production cap of a minute
REVIEW_DELAY = 2.0  # seconds: stands in for the "retry in 3 hours" of a real handler
ORDERS = [{"id": 1, "amount": 20}, {"id": 2, "amount": 250}, {"id": 3, "amount": 70}]
_CALLED = "demo.called"
_SEQUENCE = "natsmw.message.stream_sequence"


def say(text: str) -> None:
    print(text, flush=True)


def narrated() -> Middleware:
    """Tells what happens to each delivery, seen from outside the delay cap."""

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        meta = msg.metadata
        where = f"  order message #{meta.sequence.stream}, delivery {meta.num_delivered}:"

        async def report(settlement: Settlement, send: Settle) -> object:
            sent = describe(settlement)
            if msg.state.get(_CALLED):
                say(f"{where} the handler ran, the server got: {sent}")
            else:
                say(f"{where} held by natsmw without calling the handler, the server got: {sent}")
            return await send(settlement)

        with msg.intercept(report):
            await call_next(msg)

    return middleware(step)


def marks_handler_runs() -> Middleware:
    """Innermost: notes that the delivery got past the delay cap to the handler."""

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        msg.state[_CALLED] = True
        await call_next(msg)

    return middleware(step)


def show_trace(spans: Sequence[ReadableSpan], sequence: int) -> None:
    """Print the spans of one stream message as a tracing backend would list them."""
    mine = [s for s in spans if (s.attributes or {}).get(_SEQUENCE) == sequence]
    mine.sort(key=lambda span: span.start_time or 0)
    say(f"The trace of order message #{sequence}, as with_tracing() recorded it:")
    for span in mine:
        attributes = span.attributes or {}
        settled = attributes.get("natsmw.settlement")
        delay = attributes.get("natsmw.nak.delay_s")
        after = f" nak(delay={delay:.2f}s)" if isinstance(delay, float) else f" {settled}"
        delivery = attributes.get("natsmw.message.delivery_count")
        say(f"  span {span.context.span_id:016x} {span.name} (CONSUMER), delivery {delivery}, "
            f"settled:{after}")  # fmt: skip
        for event in span.events:
            details = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in (event.attributes or {}).items()
            )
            say(f"      event {event.name}: {details}")
        for link in span.links:
            say(f"      link to span {link.context.span_id:016x}: the one that asked for the delay")


def _short(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def describe(settlement: Settlement) -> str:
    if settlement.kind == "nak" and settlement.delay:
        return f"nak(delay={settlement.delay:.2f}s)"
    return settlement.kind


async def run_demo() -> int:
    with NatsServer() as server:
        say(f"Started an embedded nats-server with JetStream at {server.url}")
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        say("Created stream ORDERS (subjects orders.>) and a durable push consumer 'billing'.")
        say(
            f"The legacy handler asks for a {REVIEW_DELAY:.0f}s delay on large orders "
            f"(think: 3 hours). It is wrapped in with_delay_cap({CAP}), so the server never "
            f"sees a nak longer than {CAP}s, and the handler never sees the order early. "
            f"This demo shows the hold tier (parking=False); examples/parking.py shows long "
            f"delays parked in the server's own scheduler."
        )

        done = asyncio.Event()
        billed: dict[int, float] = {}
        asked: dict[int, float] = {}
        calls: dict[int, int] = {}
        # The hold tier, shown nak by nak; examples/parking.py shows the park tier.
        cap = with_delay_cap(CAP, parking=False)

        # A legacy handler, unchanged: large orders wait for a review, then get billed.
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))

        @compose(
            with_tracing(tracer_provider=tracer_provider), narrated(), cap, marks_handler_runs()
        )
        async def bill(msg: Msg) -> None:
            order = json.loads(msg.data)
            if order["amount"] > 100 and handler_calls(msg) == 1:
                asked[order["id"]] = time.time()
                say(f"  order {order['id']} is large: the handler calls nak(delay={REVIEW_DELAY})")
                await msg.nak(delay=REVIEW_DELAY)
                return
            billed[order["id"]] = time.time()
            calls[order["id"]] = handler_calls(msg)
            await msg.ack()
            if len(billed) == len(ORDERS):
                done.set()

        await js.subscribe("orders.>", durable="billing", cb=bill, manual_ack=True)
        say(f"Publishing {len(ORDERS)} orders:")
        for order in ORDERS:
            await js.publish("orders.new", json.dumps(order).encode())
        await asyncio.wait_for(done.wait(), timeout=30)
        waited = billed[2] - asked[2]
        say(
            f"Done: orders {sorted(billed)} billed. Order 2 reached the handler again "
            f"{waited:.2f}s after it asked for {REVIEW_DELAY}s, never before; in between natsmw "
            f"held it {cap.stats.holds} times with naks of at most {CAP}s."
        )
        say(
            f"handler_calls(msg) said {calls[2]} on its last run: the handler ran twice, while "
            f"the server delivered it {cap.stats.holds + 2} times. The naks are a little "
            f"shorter than the cap because of jitter (up to {cap.jitter:.0%} off each, so that "
            f"many held messages do not come back in step); the last one waits only for what "
            f"is left. Its deadline is kept in the JetStream key-value bucket natsmw_deadlines, "
            f"shared by every instance of the consumer."
        )
        stats = cap.stats
        say(
            f"cap.stats: capped={stats.capped} holds={stats.holds} stretched={stats.stretched} "
            f"forced_runs={stats.forced_runs} store_errors={stats.store_errors}"
        )
        await nc.drain()
        show_trace(spans.get_finished_spans(), sequence=2)
    say("Stopped the embedded server and removed its temporary store.")
    return 0
