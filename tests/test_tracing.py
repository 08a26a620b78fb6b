"""with_tracing on a real server, against an in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes

from natsmw import compose, middleware, with_delay_cap, with_size_limit
from natsmw.message import MessageProxy
from natsmw.tracing import publish, with_tracing
from tests.conftest import Connection, Inbox, NotifyingExporter, Stream
from tests.delay_support import CAP, LegacyHandler, fetch_and_handle, pulling, serving


class StartAttributes(Sampler):
    """Samples everything in, and keeps the attributes each span had at its start."""

    def __init__(self) -> None:
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.links: dict[str, list[list[Link]]] = {}  # the links each span had at its start

    def should_sample(
        self, parent_context: Context | None, trace_id: int, name: str,
        kind: SpanKind | None = None, attributes: Attributes = None,
        links: Sequence[Link] | None = None, trace_state: Any = None,
    ) -> SamplingResult:  # fmt: skip
        self.seen.setdefault(name, []).append(dict(attributes or {}))
        self.links.setdefault(name, []).append(list(links or []))
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links)

    def get_description(self) -> str:
        return "StartAttributes"


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans: NotifyingExporter
    metrics: InMemoryMetricReader
    sampler: StartAttributes

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name in (None, s.name)]

    def metric(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        points = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    sampler = StartAttributes()
    spans = NotifyingExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(tracer_provider, meter_provider, spans, reader, sampler)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def traced(telemetry: Telemetry) -> Any:
    return with_tracing(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )


async def test_process_span_has_name_kind_and_attributes_at_start(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    done = Inbox()

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        await msg.ack()
        await done.put(msg)

    await conn.js.subscribe(stream.subject, durable="orders", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"12345", headers={"Nats-Msg-Id": "order-1"})
    await done.wait_for(1)

    (span,) = telemetry.finished(f"process {stream.subject}")
    assert span.kind is SpanKind.CONSUMER
    url = conn.nc.connected_url
    assert url is not None
    expected = {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": stream.subject,
        "messaging.destination.template": stream.subject,  # the consumer's filter subject
        "messaging.consumer.group.name": "orders",
        "messaging.message.id": "order-1",
        "messaging.message.body.size": 5,
        "server.address": url.hostname,
        "server.port": url.port,
        "natsmw.stream.name": stream.name,
        "natsmw.message.stream_sequence": ack.seq,
        "natsmw.message.delivery_count": 1,
    }
    assert telemetry.sampler.seen[span.name] == [expected]  # all of it known at start
    assert span.attributes == {**expected, "natsmw.settlement": "ack"}


async def test_reply_inboxes_and_queue_groups(conn: Connection, telemetry: Telemetry) -> None:
    @traced(telemetry)
    async def responder(msg: Msg) -> None:
        await msg.respond(b"pong")

    @traced(telemetry)
    async def reply_reader(msg: Msg) -> None:
        pass

    await conn.nc.subscribe("svc.ping", queue="workers", cb=responder)
    inbox = conn.nc.new_inbox()
    await conn.nc.subscribe(inbox, cb=reply_reader)
    await conn.nc.publish("svc.ping", b"ping", reply=inbox)
    await telemetry.spans.wait_for(2)  # both spans end on the subscriptions' own tasks

    served, replied = telemetry.finished("process svc.ping"), telemetry.finished("process _INBOX.")
    assert served[0].attributes["messaging.consumer.group.name"] == "workers"  # type: ignore[index]
    assert replied[0].attributes["messaging.destination.name"] == "_INBOX."  # type: ignore[index]
    assert replied[0].attributes["messaging.destination.temporary"] is True  # type: ignore[index]


async def test_exception_is_recorded_and_still_propagates(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    psub = await conn.js.pull_subscribe(stream.subject, durable="failing")
    await conn.js.publish(stream.subject, b"x")
    (msg,) = await psub.fetch(1, timeout=5)

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        raise KeyError("customer")

    with pytest.raises(KeyError, match="customer"):
        await handler(msg)

    (span,) = telemetry.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "KeyError"  # type: ignore[index]
    assert span.attributes["natsmw.settlement"] == "none"  # type: ignore[index]
    assert [e.name for e in span.events] == ["exception"]
    (point,) = telemetry.metric("messaging.process.duration")
    assert point.attributes["error.type"] == "KeyError"


async def test_context_from_the_publish_helper_is_parent_and_link(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    psub = await conn.js.pull_subscribe(stream.subject, durable="ctx")
    await publish(conn.js, stream.subject, b"x", tracer_provider=telemetry.tracer_provider)
    await publish(conn.js, stream.subject, b"y", tracer_provider=telemetry.tracer_provider)
    first, second = await psub.fetch(2, timeout=5)

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        await msg.ack()

    await handler(first)  # no ambient span: the producer's context becomes the parent
    tracer = telemetry.tracer_provider.get_tracer("worker")
    with tracer.start_as_current_span("worker loop"):
        await handler(second)  # an ambient span stays the parent; the producer is linked

    producers = telemetry.finished(f"send {stream.subject}")
    consumers = telemetry.finished(f"process {stream.subject}")
    (worker,) = telemetry.finished("worker loop")
    assert [p.kind for p in producers] == [SpanKind.PRODUCER] * 2
    assert consumers[0].parent is not None
    assert consumers[0].parent.span_id == producers[0].context.span_id
    assert consumers[1].parent is not None
    assert consumers[1].parent.span_id == worker.context.span_id
    for consumer, producer in zip(consumers, producers, strict=True):
        assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]


async def test_delay_and_guard_events_and_a_link_back_to_the_deferring_span(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    await conn.js.add_stream(name="DEADT", subjects=["natsmw.dead_letter.>"])
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="evt", ack_wait=30))
    legacy = LegacyHandler()
    chain = compose(traced(telemetry), with_size_limit(max_body=100), with_delay_cap(CAP))
    async with pulling(conn.js, stream.subject, "evt", chain(legacy)):
        await conn.js.publish(stream.subject, b"x" * 101)
        await conn.js.publish(stream.subject, b"job")
        _, second = await legacy.wait_calls(2)

    spans = telemetry.finished(f"process {stream.subject}")
    events = {e.name: e for s in spans for e in s.events}
    rejected = events["natsmw.guard.rejected"].attributes
    assert (rejected["natsmw.guard.limit"], rejected["natsmw.guard.size"]) == ("body", 101)
    assert events["natsmw.guard.dead_lettered"].attributes["natsmw.guard.dead_letter_subject"] == (
        f"natsmw.dead_letter.{stream.name}"
    )
    capped = events["natsmw.delay.capped"].attributes
    assert (capped["natsmw.delay.requested_s"], capped["natsmw.delay.cap_s"]) == (2.0, CAP)
    # Holds are settlements, not processing: no span each. One span per delivery that was
    # rejected or reached the handler: the rejected message, the deferring run, the final run.
    assert second.num_delivered > 3  # there were holds
    assert len(spans) == 3
    assert not any(e.name == "natsmw.delay.hold" for s in spans for e in s.events)

    deferring = next(s for s in spans if any(e.name == "natsmw.delay.capped" for e in s.events))
    final = next(s for s in spans if any(e.name == "natsmw.delay.released" for e in s.events))
    assert [link.context.span_id for link in final.links] == [deferring.context.span_id]
    assert final.links[0].attributes == {"natsmw.link": "deferred_by"}
    rejected_span = next(
        s for s in spans if any(e.name == "natsmw.guard.rejected" for e in s.events)
    )
    assert rejected_span.attributes["natsmw.settlement"] == "term"  # type: ignore[index]
    assert final.attributes["natsmw.settlement"] == "ack"  # type: ignore[index]
    assert final.attributes["natsmw.deferral.held_deliveries"] == second.num_delivered - 2  # type: ignore[index]
    assert deferring.attributes["natsmw.settlement"] == "nak"  # type: ignore[index]
    assert deferring.attributes["natsmw.nak.delay_s"] <= CAP  # type: ignore[index,operator]  # the server's
    # The link and the deferral's figures were there at the start, for samplers to see.
    started = telemetry.sampler.links[f"process {stream.subject}"]
    assert [[link.context.span_id for link in links] for links in started].count(
        [deferring.context.span_id]
    ) == 1
    assert any(
        seen.get("natsmw.deferral.held_deliveries") == second.num_delivered - 2
        for seen in telemetry.sampler.seen[f"process {stream.subject}"]
    )
    await conn.js.delete_stream("DEADT")


async def test_metrics_after_a_known_sequence(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="m", ack_wait=30))
    legacy = LegacyHandler(delay=1.0)
    cap = with_delay_cap(CAP)
    chain = compose(traced(telemetry), with_size_limit(max_body=100, on_oversize="term"), cap)
    async with pulling(conn.js, stream.subject, "m", chain(legacy)):
        await conn.js.publish(stream.subject, b"x" * 101)
        await conn.js.publish(stream.subject, b"job")
        await legacy.wait_calls(2)

    deliveries = len(telemetry.finished())
    (consumed,) = telemetry.metric("messaging.client.consumed.messages")
    (duration,) = telemetry.metric("messaging.process.duration")
    # The rejected message and the handler's two runs; holds reach no application.
    assert cap.stats.holds > 0
    assert consumed.value == deliveries == 1 + 2
    assert duration.count == deliveries
    assert consumed.attributes == {  # low cardinality: no subject, no consumer name
        "messaging.system": "nats", "messaging.operation.name": "process",
        "natsmw.stream.name": stream.name, "server.address": "127.0.0.1",
    }  # fmt: skip
    assert [p.value for p in telemetry.metric("natsmw.delay.capped")] == [1]
    assert sum(p.value for p in telemetry.metric("natsmw.delay.holds")) == cap.stats.holds
    (rejections,) = telemetry.metric("natsmw.guard.rejections")
    assert rejections.value == 1
    assert rejections.attributes["natsmw.guard.action"] == "term"


async def test_metric_labels_stay_per_stream_and_an_error_marks_only_its_own_point(
    conn: Connection, telemetry: Telemetry
) -> None:
    """One tracing middleware keeps its metric labels per stream; an error adds its label to
    that message's point only (the labels kept for the stream are not changed)."""

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        if msg.data == b"fail":
            raise RuntimeError("boom")
        await msg.ack()

    fetched: list[Msg] = []
    for name, bodies in (("LABELSA", (b"ok", b"ok")), ("LABELSB", (b"fail", b"ok"))):
        await conn.js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
        psub = await conn.js.pull_subscribe(f"{name.lower()}.x", durable="d")
        for body in bodies:
            await conn.js.publish(f"{name.lower()}.x", body)
        fetched += await psub.fetch(2, timeout=5)
    for msg in fetched:
        with contextlib.suppress(RuntimeError):
            await handler(msg)

    consumed = {
        p.attributes["natsmw.stream.name"]: p.value
        for p in telemetry.metric("messaging.client.consumed.messages")
    }
    durations = {
        (p.attributes["natsmw.stream.name"], p.attributes.get("error.type")): p.count
        for p in telemetry.metric("messaging.process.duration")
    }
    assert consumed == {"LABELSA": 2, "LABELSB": 2}
    assert durations == {("LABELSA", None): 2, ("LABELSB", "RuntimeError"): 1,
                         ("LABELSB", None): 1}  # fmt: skip
    for name in ("LABELSA", "LABELSB"):
        await conn.js.delete_stream(name)


async def test_sampled_out_messages_still_flow(conn: Connection, stream: Stream) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    done = Inbox()

    @with_tracing(tracer_provider=provider)
    async def handler(msg: Msg) -> None:
        await msg.ack()
        await done.put(msg)

    await conn.js.subscribe(stream.subject, durable="off", cb=handler, manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    await done.wait_for(1)
    assert exporter.get_finished_spans() == ()


async def test_no_sdk_configured_means_no_error_and_no_span(
    conn: Connection, stream: Stream
) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # no SDK set
    seen: list[trace.Span] = []
    done = Inbox()

    @with_tracing()
    async def handler(msg: Msg) -> None:
        seen.append(trace.get_current_span())
        await msg.ack()
        await done.put(msg)

    await conn.js.subscribe(stream.subject, durable="nosdk", cb=handler, manual_ack=True)
    await publish(conn.js, stream.subject, b"x")  # the helper works without an SDK too
    (msg,) = await done.wait_for(1)

    assert seen == [trace.INVALID_SPAN]
    assert not isinstance(msg, MessageProxy)  # no SDK: the handler gets nats-py's message
    assert msg.is_acked
    assert conn.errors == []


async def test_metrics_without_a_tracing_sdk(conn: Connection, stream: Stream) -> None:
    reader = InMemoryMetricReader()
    done = Inbox()

    @with_tracing(meter_provider=MeterProvider(metric_readers=[reader]))
    async def handler(msg: Msg) -> None:
        await msg.ack()
        await done.put(msg)

    await conn.js.subscribe(stream.subject, durable="metrics-only", cb=handler, manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    await done.wait_for(1)

    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    assert "messaging.client.consumed.messages" in names


async def test_baggage_from_the_publisher_reaches_the_handler(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    from opentelemetry import baggage, context

    psub = await conn.js.pull_subscribe(stream.subject, durable="bag")
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        await publish(conn.js, stream.subject, b"x", tracer_provider=telemetry.tracer_provider)
    finally:
        context.detach(token)
    (msg,) = await psub.fetch(1, timeout=5)
    seen: list[object] = []

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        seen.append(baggage.get_baggage("tenant"))
        await msg.ack()

    await handler(msg)
    assert seen == ["acme"]


async def test_pull_worker_under_install_gets_a_span_per_handler_run_and_the_link_back(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    from natsmw.installation import install, uninstall

    cap = with_delay_cap(CAP, parking=False)
    install(conn.nc, chain=compose(traced(telemetry), cap))
    js = conn.nc.jetstream()
    psub = await js.pull_subscribe(stream.subject, durable="worker")
    legacy = LegacyHandler()
    await js.publish(stream.subject, b"job")
    batches = await fetch_and_handle(psub, legacy, calls=2)
    await psub.unsubscribe()
    uninstall(conn.nc)
    await telemetry.spans.wait_for(2)

    spans = telemetry.finished(f"process {stream.subject}")
    deliveries = [s.attributes["natsmw.message.delivery_count"] for s in spans]  # type: ignore[index]
    # One span per delivery the handler saw: the first and the last (holds make none).
    assert cap.stats.holds > 0
    assert sorted(deliveries) == [1, cap.stats.holds + 2]
    assert all(batches)  # held deliveries never came back as an empty batch
    deferring = next(s for s in spans if any(e.name == "natsmw.delay.capped" for e in s.events))
    final = next(s for s in spans if any(e.name == "natsmw.delay.released" for e in s.events))
    assert [link.context.span_id for link in final.links] == [deferring.context.span_id]


async def test_a_parked_message_runs_in_a_span_linked_to_the_one_that_parked_it(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    from natsmw.delay.park import park_stream
    from natsmw.installation import install, uninstall

    cap = with_delay_cap(CAP)
    # Made by the first long nak where missing (which is then held): here, made beforehand.
    await park_stream(conn.nc).ensure()
    install(conn.nc, chain=compose(traced(telemetry), cap))
    legacy = LegacyHandler()
    try:
        await conn.nc.jetstream().subscribe(
            stream.subject, durable="parked", cb=legacy, manual_ack=True
        )
        # Until the subscription serves its due messages, a long nak is held, not parked.
        await serving(conn.nc, stream.name, "parked")
        await conn.js.publish(stream.subject, b"job")
        await legacy.wait_calls(2)
    finally:
        uninstall(conn.nc)
    await telemetry.spans.wait_for(2)

    spans = telemetry.finished(f"process {stream.subject}")
    assert len(spans) == 2  # the deferring run and the due run: nothing in between
    deferring, final = sorted(spans, key=lambda span: span.start_time or 0)
    assert [e.name for e in deferring.events] == ["natsmw.delay.parked"]
    assert deferring.attributes["natsmw.settlement"] == "ack"  # type: ignore[index]
    (unparked,) = [e for e in final.events if e.name == "natsmw.delay.unparked"]
    assert unparked.attributes["natsmw.delay.late_s"] >= 0  # type: ignore[index,operator]
    assert [link.context.span_id for link in final.links] == [deferring.context.span_id]
    assert final.attributes["messaging.destination.name"] == stream.subject  # type: ignore[index]
    # Its consumer's template, although it came through natsmw's own pull.
    assert final.attributes["messaging.destination.template"] == stream.subject  # type: ignore[index]
    # The due copy is reported as the original: its stream, consumer and sequence.
    assert final.attributes["natsmw.stream.name"] == stream.name  # type: ignore[index]
    assert final.attributes["messaging.consumer.group.name"] == "parked"  # type: ignore[index]
    assert final.attributes["natsmw.message.delivery_count"] == 2  # type: ignore[index]
    assert telemetry.metric("natsmw.delay.parked")[0].value == 1
    assert telemetry.metric("natsmw.delay.unparked")[0].value == 1


async def test_process_duration_uses_the_conventions_bucket_boundaries(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    """2 ms and 200 ms runs land in different buckets (the SDK's default bounds are for
    milliseconds: both would be in the first one)."""
    done = Inbox()

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        await asyncio.sleep(0.2 if msg.data == b"slow" else 0.002)
        await msg.ack()
        await done.put(msg)

    await conn.js.subscribe(stream.subject, durable="buckets", cb=handler, manual_ack=True)
    await conn.js.publish(stream.subject, b"fast")
    await conn.js.publish(stream.subject, b"slow")
    await done.wait_for(2)

    (duration,) = telemetry.metric("messaging.process.duration")
    assert list(duration.explicit_bounds) == [
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
    ]  # fmt: skip
    filled = [i for i, count in enumerate(duration.bucket_counts) if count]
    assert len(filled) == 2, duration.bucket_counts


class _OtherHeaderPropagator(TextMapPropagator):
    """Reads a context from a header the W3C propagator does not know, and which its
    ``fields`` do not list (B3 reads ``b3`` and lists only ``x-b3-*``)."""

    def __init__(self, span: SpanContext) -> None:
        self._span = span

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        found = getter.get(carrier, "x-other-trace") if getter else None
        if not found:
            return context or Context()
        return trace.set_span_in_context(trace.NonRecordingSpan(self._span), context)

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return {"x-other-trace-id"}  # what it would inject


def test_a_context_in_headers_the_global_propagator_reads_is_linked(
    telemetry: Telemetry,
) -> None:
    """natsmw looks for a trace context only where the global propagator reads one: a
    propagator of other headers than traceparent is still heard."""
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(_OtherHeaderPropagator(remote))
    try:

        async def handler(msg: Msg) -> None:
            pass

        handle = traced(telemetry)(handler)
        client = SimpleNamespace(_subs={})
        for headers in ({"x-other-trace": "1"}, {"Nats-Msg-Id": "2"}, None):
            msg = Msg(_client=client, subject="core.x", data=b"", headers=headers)  # type: ignore[arg-type]
            coroutine = handle(msg)
            with contextlib.suppress(StopIteration):
                coroutine.send(None)
    finally:
        propagate.set_global_textmap(before)

    linked, plain, bare = telemetry.finished("process core.x")
    assert [link.context for link in linked.links] == [remote]
    assert linked.parent == remote  # no ambient span: the creation context is the parent
    for unlinked in (plain, bare):
        assert not unlinked.links
        assert unlinked.parent is None


NO_SDK_THEN_SDK = """
import asyncio
from types import SimpleNamespace
from nats.aio.msg import Msg
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from natsmw.tracing import Tracing, with_tracing

asked = 0
found = Tracing._sdk_found
def counted(self):
    global asked
    asked += 1
    return found(self)
Tracing._sdk_found = counted

async def handler(msg):
    pass

handle = with_tracing()(handler)
def deliver():
    msg = Msg(_client=SimpleNamespace(_subs={}), subject="core.x", data=b"")
    asyncio.run(handle(msg))

trace.set_tracer_provider(trace.NoOpTracerProvider())  # a provider, but no SDK
for _ in range(100):
    deliver()
print("asked with no SDK:", asked)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # an SDK, set later
deliver()
names = [m.name for r in reader.get_metrics_data().resource_metrics
         for s in r.scope_metrics for m in s.metrics]
print("consumed after:", "messaging.client.consumed.messages" in names)
"""


def test_no_sdk_is_decided_once_and_an_sdk_set_later_is_noticed(tmp_path: Any) -> None:
    """In a process of its own (the API's globals can be set once): with a provider but no
    SDK, natsmw asks once, not per message; a meter provider set later records."""
    script = tmp_path / "later.py"
    script.write_text(NO_SDK_THEN_SDK)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert "asked with no SDK: 1\n" in result.stdout, result.stdout + result.stderr
    assert "consumed after: True" in result.stdout, result.stdout + result.stderr


async def test_span_names_follow_the_subscription_not_the_message_subject(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    """A wildcard subscription (core) and a consumer filter (JetStream push) name the spans;
    each message's own subject stays in messaging.destination.name."""
    done = Inbox()

    @traced(telemetry)
    async def handler(msg: Msg) -> None:
        await done.put(msg)

    await conn.nc.subscribe("core.*.created", cb=handler)
    for customer in ("customer-1", "customer-2"):
        await conn.nc.publish(f"core.{customer}.created", b"x")
    await done.wait_for(2)

    spans = telemetry.finished("process core.*.created")
    assert sorted(s.attributes["messaging.destination.name"] for s in spans) == [  # type: ignore[index]
        "core.customer-1.created", "core.customer-2.created",
    ]  # fmt: skip
    assert {s.attributes["messaging.destination.template"] for s in spans} == {"core.*.created"}  # type: ignore[index]
    assert not telemetry.finished("process core.customer-1.created")


async def test_a_stretched_hold_is_still_no_span(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    """Under a low max_deliver the cap stretches its holds and says so (a survival report
    before the hold): still a hold, no span, not a consumed message."""
    config = ConsumerConfig(durable_name="stretch", ack_wait=30, max_deliver=4)
    await conn.js.add_consumer(stream.name, config)
    legacy = LegacyHandler(delay=1.0)
    cap = with_delay_cap(CAP, parking=False)
    async with pulling(conn.js, stream.subject, "stretch", compose(traced(telemetry), cap)(legacy)):
        await conn.js.publish(stream.subject, b"job")
        await legacy.wait_calls(2)
    await telemetry.spans.wait_for(2)

    assert cap.stats.stretched > 0
    assert len(telemetry.finished()) == 2
    (consumed,) = telemetry.metric("messaging.client.consumed.messages")
    assert consumed.value == 2
    survivals = telemetry.metric("natsmw.delay.survivals")
    assert sum(p.value for p in survivals) >= 1  # said in its counter


async def test_a_middleware_that_runs_the_rest_in_a_task_leaves_the_context_clean(
    conn: Connection, stream: Stream, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    """The span's context is attached and detached around the run, in one task, even when a
    middleware between tracing and the cap runs the rest of the chain in a task of its own."""

    async def timeout(msg: MessageProxy, call_next: Any) -> None:
        await asyncio.wait_for(call_next(msg), 5)  # a task of its own on Python 3.11

    seen: list[trace.Span] = []

    async def handler(msg: Msg) -> None:
        seen.append(trace.get_current_span())
        await msg.ack()

    await conn.js.add_consumer(stream.name, ConsumerConfig(durable_name="tasked", ack_wait=30))
    chain = compose(traced(telemetry), middleware(timeout), with_delay_cap(CAP, parking=False))
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        async with pulling(conn.js, stream.subject, "tasked", chain(handler)):
            await conn.js.publish(stream.subject, b"job")
            await telemetry.spans.wait_for(1)

    (span,) = telemetry.finished()
    assert seen[0].get_span_context() == span.context  # current in the handler
    assert trace.get_current_span() is trace.INVALID_SPAN  # and nothing left attached
    assert "Failed to detach context" not in caplog.text


async def test_a_pull_workers_own_tracing_runs_its_handler_in_its_span_under_install(
    conn: Connection, stream: Stream, telemetry: Telemetry
) -> None:
    """install(chain=with_tracing()) traces at fetch, where the handler does not run: a
    handler with a tracing and a cap of its own gets its span current, and no hold a span."""
    from natsmw.installation import install, uninstall

    current: list[trace.Span] = []
    legacy = LegacyHandler()

    async def handler(msg: Msg) -> None:
        current.append(trace.get_current_span())
        await legacy(msg)

    own = compose(traced(telemetry), with_delay_cap(CAP, parking=False))(handler)
    install(conn.nc, chain=traced(telemetry))
    try:
        psub = await conn.nc.jetstream().pull_subscribe(stream.subject, durable="own")
        await conn.js.publish(stream.subject, b"job")

        async def work() -> None:
            while len(legacy.calls) < 2:
                with contextlib.suppress(asyncio.TimeoutError):
                    for msg in await psub.fetch(10, timeout=0.5):
                        await own(msg)

        await asyncio.wait_for(work(), 10)
        await psub.unsubscribe()
    finally:
        uninstall(conn.nc)
    await telemetry.spans.wait_for(2)

    assert all(span.get_span_context().is_valid for span in current)
    runs = [s for s in telemetry.finished() if s.context in [c.get_span_context() for c in current]]
    assert len(runs) == 2  # the handler's own spans, current in it
    assert not any(e.name == "natsmw.delay.hold" for s in telemetry.finished() for e in s.events)
    assert len(telemetry.finished()) <= 4  # at most a fetch span per run besides: none per hold
