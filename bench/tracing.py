"""What tracing costs per message: natsmw's with_tracing, a bare SDK span, and the reference
instrumentation (otel-instrumentation-nats), against raw nats-py in the same run.

    pip install -e '.[bench]'
    python -m bench.tracing [--messages N] [--rounds R]

Spans are created and ended but not exported (a span processor that drops them), so the
figures are the cost of tracing itself, not of an exporter. As in bench/consume.py, a warm-up
round is not counted, the order of the variants rotates from round to round, and each figure
is the median over the rounds of a ratio to raw nats-py's drain in the same round. Results go
to bench/results/tracing.json.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import SpanKind

from bench.common import Handler, Variant, compare, write_report
from natsmw import with_tracing


class Drop(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        pass


def provider(sampler: Sampler) -> TracerProvider:
    made = TracerProvider(sampler=sampler)
    made.add_span_processor(Drop())
    return made


SAMPLED_IN, SAMPLED_OUT = provider(ALWAYS_ON), provider(ALWAYS_OFF)


async def ack(msg: Msg) -> None:
    await msg.ack()


def bare_span(nc: Client, provider: TracerProvider = SAMPLED_IN) -> Handler:
    tracer = provider.get_tracer("bench")

    async def handle(msg: Msg) -> None:
        with tracer.start_as_current_span(f"process {msg.subject}", kind=SpanKind.CONSUMER):
            await msg.ack()

    return handle


def attributed_span(nc: Client) -> Handler:
    """A bare span with the attributes with_tracing sets: what the conventions alone cost."""
    tracer = SAMPLED_IN.get_tracer("bench")

    async def handle(msg: Msg) -> None:
        meta = msg.metadata
        attributes = {
            "messaging.system": "nats", "messaging.operation.name": "process",
            "messaging.operation.type": "process", "messaging.destination.name": msg.subject,
            "messaging.consumer.group.name": meta.consumer,
            "messaging.message.body.size": len(msg.data),
            "server.address": "127.0.0.1", "server.port": 4222,
            "natsmw.stream.name": meta.stream,
            "natsmw.message.stream_sequence": meta.sequence.stream,
            "natsmw.message.delivery_count": meta.num_delivered,
        }  # fmt: skip
        with tracer.start_as_current_span(
            f"process {msg.subject}", kind=SpanKind.CONSUMER, attributes=attributes
        ):
            await msg.ack()

    return handle


def reference() -> Variant:
    from otel_instrumentation_nats import NatsInstrumentor

    instrumentor = NatsInstrumentor()

    def prepare(nc: Client) -> Handler:
        instrumentor.instrument(tracer_provider=SAMPLED_IN)  # patches Client.subscribe
        return ack

    return Variant("otel-instrumentation-nats, sampled in", prepare, instrumentor.uninstrument)


VARIANTS = [
    Variant("raw nats-py", lambda nc: ack),
    Variant("with_tracing, no SDK configured", lambda nc: with_tracing()(ack)),
    Variant("with_tracing, sampled out", lambda nc: with_tracing(tracer_provider=SAMPLED_OUT)(ack)),
    Variant("bare SDK span per message, sampled out", lambda nc: bare_span(nc, SAMPLED_OUT)),
    Variant("bare SDK span per message, sampled in", bare_span),
    Variant("SDK span + the same attributes, sampled in", attributed_span),
    Variant("with_tracing, sampled in", lambda nc: with_tracing(tracer_provider=SAMPLED_IN)(ack)),
    reference(),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--headers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tracing.json"))
    args = parser.parse_args()
    results = asyncio.run(compare(VARIANTS, messages=args.messages, rounds=args.rounds,
                                  headers=args.headers, title="tracing cost"))  # fmt: skip
    write_report(args.out, "push consume + ack with tracing", results, unit="by_variant",
                 messages=args.messages, rounds=args.rounds, headers=args.headers)  # fmt: skip


if __name__ == "__main__":
    main()
