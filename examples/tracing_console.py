"""Trace a natsmw consumer and print the spans to the console.

    pip install -e '.[demo]'
    python examples/tracing_console.py

To send the spans to a collector instead, install the OTLP exporter and swap the processor:

    pip install opentelemetry-exporter-otlp-proto-http
    # then, below:
    #   from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    #   provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
    #       endpoint="http://localhost:4318/v1/traces")))

or keep this file as it is and configure the exporter with the standard environment variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``) through ``opentelemetry-instrument``.
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from natsmw import compose, handler_calls, publish, with_delay_cap, with_tracing
from natsmw.server import NatsServer

provider = TracerProvider(resource=Resource.create({"service.name": "natsmw-example"}))
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)

done = asyncio.Event()


@compose(with_tracing(), with_delay_cap(0.2))
async def remind(msg: Msg) -> None:
    if handler_calls(msg) == 1:
        await msg.nak(delay=1.0)  # "remind me in an hour", compressed
        return
    await msg.ack()
    done.set()


async def main() -> None:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="REMINDERS", subjects=["reminders.>"])
        await js.subscribe("reminders.>", durable="reminder", cb=remind, manual_ack=True)
        await publish(js, "reminders.new", b"call the customer")  # a PRODUCER span
        await asyncio.wait_for(done.wait(), timeout=10)
        await nc.drain()
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
