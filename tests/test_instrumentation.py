"""Zero-code tracing: NatsmwInstrumentor in-process, and the real `opentelemetry-instrument`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import propagate
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

import natsmw
import natsmw.installation
from natsmw import Handler, MessageProxy, Middleware, middleware
from natsmw.installation import SUPPORTED_NATS_PY
from natsmw.instrumentation import NatsmwInstrumentor
from natsmw.server import NatsServer
from tests.conftest import Connection, Inbox, NotifyingExporter, Stream, connect, flushed


class Spans(NotifyingExporter):
    """The finished spans, waited for; one of them by name."""

    def named(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.get_finished_spans() if s.name == name]
        return span


class Telemetry:
    def __init__(self) -> None:
        self.spans = Spans()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])

    def consumed(self) -> float:
        """The count of messaging.client.consumed.messages, over every label set."""
        data = self.metrics.get_metrics_data()
        total = 0.0
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "messaging.client.consumed.messages":
                        points = metric.data.data_points
                        total += sum(p.value for p in points if isinstance(p, NumberDataPoint))
        return total


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.tracer_provider.shutdown()
    telemetry.meter_provider.shutdown()


@pytest.fixture
def instrumentor() -> Iterator[NatsmwInstrumentor]:
    """The instrumentor, not yet instrumented; uninstrumented after the test whatever happens."""
    instrumentor = NatsmwInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def instrument(instrumentor: NatsmwInstrumentor, telemetry: Telemetry) -> None:
    instrumentor.instrument(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Any]:
    """Connects clients when the test says so (before or after instrument()); drains them."""
    made: list[Connection] = []

    async def make() -> Connection:
        made.append(await connect(nats_server.url))
        return made[-1]

    yield make
    for connection in made:
        await connection.nc.drain()


def tagging(seen: list[str]) -> Middleware:
    async def step(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg.subject)
        await call_next(msg)

    return middleware(step)


def patched_now() -> dict[str, object]:
    """What the instrumentor patches, as it is now."""
    return {
        "Client.connect": vars(Client)["connect"],
        "Client.publish": vars(Client)["publish"],
        "JetStreamContext.publish": vars(JetStreamContext)["publish"],
        "natsmw.install": natsmw.install,
        "natsmw.installation.install": natsmw.installation.install,
    }


def assert_linked(process: ReadableSpan, send: ReadableSpan) -> None:
    """``process`` is a CONSUMER span that links to the PRODUCER span ``send``, its parent."""
    assert process.kind is SpanKind.CONSUMER
    assert send.kind is SpanKind.PRODUCER
    assert send.context is not None
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id


async def test_consumers_of_a_client_connected_after_instrument_link_to_plain_publishes(
    stream: Stream, client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    instrument(instrumentor, telemetry)
    connection = await client()  # connected after instrument(): natsmw is installed on it
    nc, js = connection.nc, connection.js
    prefix = stream.subject.rsplit(".", 1)[0]
    core, pushed = Inbox(), Inbox()
    await nc.subscribe("instrumented.core", cb=core.put)
    await js.subscribe(f"{prefix}.push", durable="instrumented-push", cb=pushed.put)
    psub = await js.pull_subscribe(f"{prefix}.pull", durable="instrumented-pull")

    await nc.publish("instrumented.core", b"core")  # plain nats-py calls, nothing of natsmw
    push_ack = await js.publish(f"{prefix}.push", b"push")
    await js.publish(f"{prefix}.pull", b"pull")
    await core.wait_for(1)
    await pushed.wait_for(1)
    (fetched,) = await psub.fetch(1, timeout=5)
    await fetched.ack()  # the fetched message's span ends when the caller settles it
    await telemetry.spans.wait_for(6)

    assert sorted(s.name for s in telemetry.spans.get_finished_spans()) == sorted(
        [
            "send instrumented.core",
            "process instrumented.core",
            f"send {prefix}.push",
            f"process {prefix}.push",
            f"send {prefix}.pull",
            f"process {prefix}.pull",
        ]
    )  # no span for nats-py's own messages: acks, the JetStream API, the pull requests
    for subject in ("instrumented.core", f"{prefix}.push", f"{prefix}.pull"):
        assert_linked(
            telemetry.spans.named(f"process {subject}"), telemetry.spans.named(f"send {subject}")
        )
    push_send = telemetry.spans.named(f"send {prefix}.push")
    assert push_send.attributes is not None
    assert push_send.attributes["natsmw.stream.name"] == stream.name
    assert push_send.attributes["natsmw.message.stream_sequence"] == push_ack.seq
    pulled = telemetry.spans.named(f"process {prefix}.pull")
    assert pulled.attributes is not None
    assert pulled.attributes["natsmw.settlement"] == "ack"
    assert telemetry.consumed() == 3  # the meter provider given to instrument()
    await psub.unsubscribe()


async def test_a_publish_traced_by_natsmw_publish_gets_one_span(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    instrument(instrumentor, telemetry)
    connection = await client()
    received = Inbox()
    await connection.nc.subscribe("instrumented.helper", cb=received.put)

    await natsmw.publish(
        connection.nc, "instrumented.helper", b"x", tracer_provider=telemetry.tracer_provider
    )
    await received.wait_for(1)
    await telemetry.spans.wait_for(2)

    assert sorted(s.name for s in telemetry.spans.get_finished_spans()) == [
        "process instrumented.helper",
        "send instrumented.helper",
    ]
    assert_linked(
        telemetry.spans.named("process instrumented.helper"),
        telemetry.spans.named("send instrumented.helper"),
    )


async def test_without_a_propagator_each_publish_is_still_one_span(
    stream: Stream, client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    """Nothing injected: natsmw.publish's own call of publish is still not a second send."""
    instrument(instrumentor, telemetry)
    connection = await client()
    textmap = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))  # OTEL_PROPAGATORS=none
    try:
        await connection.nc.publish("instrumented.unpropagated", b"x")
        await connection.js.publish(stream.subject, b"y")
    finally:
        propagate.set_global_textmap(textmap)

    assert [s.name for s in telemetry.spans.get_finished_spans()] == [
        "send instrumented.unpropagated",
        f"send {stream.subject}",
    ]


async def test_suppressed_instrumentation_makes_no_send_span(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    instrument(instrumentor, telemetry)
    connection = await client()

    with suppress_instrumentation():
        await connection.nc.publish("instrumented.suppressed", b"x")

    assert telemetry.spans.get_finished_spans() == ()


async def test_natsmws_own_traffic_makes_no_send_span(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    """Park schedules and clock probes carry the original message's trace context in their
    headers: a send span would replace it (and name spans after sequences)."""
    instrument(instrumentor, telemetry)
    connection = await client()

    await connection.nc.publish("natsmw.park.S.C.1.1795790264016795", b"x")
    await connection.nc.publish("instrumented.user", b"x")

    assert [s.name for s in telemetry.spans.get_finished_spans()] == ["send instrumented.user"]


async def test_a_client_connected_before_instrument_keeps_its_consumers_untraced(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    connection = await client()  # connected before instrument()
    instrument(instrumentor, telemetry)
    received = Inbox()
    await connection.nc.subscribe("instrumented.before", cb=received.put)

    await connection.nc.publish("instrumented.before", b"x")
    (msg,) = await received.wait_for(1)

    assert type(msg) is Msg  # no natsmw chain around the callback: no process span
    assert "subscribe" not in vars(connection.nc)
    # Its publishes are traced: nats-py's Client.publish is patched for every client.
    assert [s.name for s in telemetry.spans.get_finished_spans()] == ["send instrumented.before"]


async def test_uninstrument_leaves_nats_py_and_natsmw_as_they_were_and_makes_no_span(
    stream: Stream, client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    before = patched_now()
    earlier = await client()  # connected before instrument()
    instrument(instrumentor, telemetry)
    assert patched_now().keys() == before.keys()
    assert all(patched_now()[name] is not before[name] for name in before)
    during = await client()
    received = Inbox()
    await during.nc.subscribe("instrumented.during", cb=received.put)  # made while instrumented
    assert "subscribe" in vars(during.nc)

    instrumentor.uninstrument()
    later = await client()
    telemetry.spans.clear()
    for connection in (earlier, during, later):
        await connection.nc.subscribe(f"instrumented.after.{id(connection)}", cb=received.put)
    for connection in (earlier, during, later):
        await connection.nc.publish(f"instrumented.after.{id(connection)}", b"after")
        await connection.js.publish(stream.subject, b"after")
    await during.nc.publish("instrumented.during", b"during")
    messages = await received.wait_for(4)

    assert patched_now() == before
    for connection in (earlier, during, later):
        assert not {"subscribe", "jetstream", "drain", "_process_headers"} & set(
            vars(connection.nc)
        )
        assert connection.nc not in natsmw.installation._installed
    # The subscription made while instrumented keeps natsmw's wrapper, which passes the
    # message straight through: nats-py's own Msg, no proxy, no span.
    assert all(type(msg) is Msg for msg in messages)
    assert telemetry.spans.get_finished_spans() == ()


async def test_natsmw_install_on_an_instrumented_client_puts_tracing_in_front_of_its_chain(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    instrument(instrumentor, telemetry)
    connection = await client()
    seen: list[str] = []
    natsmw.install(connection.nc, chain=tagging(seen))  # no "already installed": ours made way
    received = Inbox()
    await connection.nc.subscribe("instrumented.own", cb=received.put)

    await connection.nc.publish("instrumented.own", b"x")
    await received.wait_for(1)
    await telemetry.spans.wait_for(2)

    assert seen == ["instrumented.own"]
    assert_linked(
        telemetry.spans.named("process instrumented.own"),
        telemetry.spans.named("send instrumented.own"),
    )
    # Uninstrumented, the user's install stays: their chain runs, the tracing in front of it
    # passes messages straight through.
    instrumentor.uninstrument()
    telemetry.spans.clear()
    await connection.nc.subscribe("instrumented.own.after", cb=received.put)
    await connection.nc.publish("instrumented.own.after", b"y")
    await received.wait_for(2)
    assert seen == ["instrumented.own", "instrumented.own.after"]
    assert telemetry.spans.get_finished_spans() == ()
    natsmw.uninstall(connection.nc)


async def test_a_failed_install_leaves_the_client_traced(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    instrument(instrumentor, telemetry)
    connection = await client()

    with pytest.raises(TypeError, match=r"install\(chain=...\) must be a middleware"):
        natsmw.install(connection.nc, chain=42)  # type: ignore[arg-type]

    received = Inbox()
    await connection.nc.subscribe("instrumented.kept", cb=received.put)
    await connection.nc.publish("instrumented.kept", b"x")
    await received.wait_for(1)
    await telemetry.spans.wait_for(2)
    assert telemetry.spans.named("process instrumented.kept").kind is SpanKind.CONSUMER


def test_dependencies_name_the_nats_py_natsmw_supports() -> None:
    dependencies = NatsmwInstrumentor().instrumentation_dependencies()

    assert list(dependencies) == [f"nats-py {SUPPORTED_NATS_PY}"]
    assert get_dependency_conflicts(dependencies) is None  # the nats-py installed here


def test_the_entry_point_opentelemetry_instrument_loads_is_the_instrumentor() -> None:
    (entry_point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
        if ep.name == "natsmw"
    ]

    assert entry_point.load() is NatsmwInstrumentor


def test_natsmw_imports_without_opentelemetry_instrumentation() -> None:
    """Only natsmw.instrumentation needs the package: every other module imports without."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        sys.modules["opentelemetry.instrumentation"] = None  # as if not installed
        import natsmw
        names = [m.name for m in pkgutil.walk_packages(natsmw.__path__, "natsmw.")]
        for name in names:
            if name != "natsmw.instrumentation":
                importlib.import_module(name)
        try:
            import natsmw.instrumentation
        except ImportError:
            print("ok", len(names))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


APP = """
import asyncio
import sys

import nats


async def main() -> None:
    stream = sys.argv[2]
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    arrived = {"app.orders": asyncio.Event(), f"{stream}.jobs": asyncio.Event()}

    async def handle(msg):
        arrived[msg.subject].set()

    await nc.subscribe("app.orders", cb=handle)
    await js.subscribe(f"{stream}.jobs", durable="app", cb=handle)
    await nc.publish("app.orders", b"order")
    await js.publish(f"{stream}.jobs", b"job")
    for event in arrived.values():
        await asyncio.wait_for(event.wait(), 10)
    await js.delete_stream(stream)
    await nc.drain()


asyncio.run(main())
"""


def exported_spans(output: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: JSON objects, one after another."""
    decoder = json.JSONDecoder()
    spans, at = [], output.find("{")
    while at != -1:
        span, end = decoder.raw_decode(output, at)
        spans.append(span)
        at = output.find("{", end)
    return spans


def test_opentelemetry_instrument_traces_a_plain_nats_py_app(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    command = Path(sys.executable).parent / "opentelemetry-instrument"
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": "natsmw-zero-code",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        # The reference nats-py instrumentation the benchmarks use is installed here too: two
        # instrumentors of one library trace every message twice.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "nats",
    }

    done = subprocess.run(
        [str(command), sys.executable, str(app), nats_server.url, "ZEROCODE"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=tmp_path,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    spans = {span["name"]: span for span in exported_spans(done.stdout)}
    assert set(spans) == {
        "send app.orders",
        "process app.orders",
        "send ZEROCODE.jobs",
        "process ZEROCODE.jobs",
    }, done.stdout
    for subject in ("app.orders", "ZEROCODE.jobs"):
        send, process = spans[f"send {subject}"], spans[f"process {subject}"]
        assert send["kind"] == "SpanKind.PRODUCER"
        assert process["kind"] == "SpanKind.CONSUMER"
        assert process["parent_id"] == send["context"]["span_id"]
        assert [link["context"]["span_id"] for link in process["links"]] == [
            send["context"]["span_id"]
        ]
        assert process["resource"]["attributes"]["service.name"] == "natsmw-zero-code"
    assert spans["process ZEROCODE.jobs"]["attributes"]["natsmw.stream.name"] == "ZEROCODE"
    assert spans["send ZEROCODE.jobs"]["attributes"]["natsmw.stream.name"] == "ZEROCODE"


async def test_a_handler_decorated_with_its_own_tracing_gets_one_span(
    client: Any, telemetry: Telemetry, instrumentor: NatsmwInstrumentor
) -> None:
    from natsmw import compose, with_tracing

    instrument(instrumentor, telemetry)
    connection = await client()
    received = Inbox()
    own = with_tracing(tracer_provider=telemetry.tracer_provider)

    @compose(own)
    async def handle(msg: Msg) -> None:
        await received.put(msg)

    await connection.nc.subscribe("instrumented.decorated", cb=handle)
    await connection.nc.publish("instrumented.decorated", b"x")
    await received.wait_for(1)
    await telemetry.spans.wait_for(2)
    await flushed(connection.nc)
    assert sorted(s.name for s in telemetry.spans.get_finished_spans()) == [
        "process instrumented.decorated",
        "send instrumented.decorated",
    ]
