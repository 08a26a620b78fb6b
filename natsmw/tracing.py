"""OpenTelemetry spans and metrics that answer "why did this message run late?".

``with_tracing()`` opens a CONSUMER span ``process {subject}`` around each message, with the
messaging semantic conventions (semconv 1.44) set at span start, and turns what the other
natsmw middlewares report (caps, holds, survival decisions, guard rejections) into span
events and counters. When the handler finally runs after a deferral, its span links to the
span that asked for the delay.

natsmw depends on ``opentelemetry-api`` only: with no SDK configured, the middleware passes
messages straight through.

Attributes beyond the conventions, all under ``messaging.nats.*``:

* ``messaging.nats.stream.name``: the JetStream stream;
* ``messaging.nats.message.stream_sequence``: the message's sequence in that stream;
* ``messaging.nats.message.delivery_count``: ``num_delivered``, holds included;
* ``messaging.nats.settlement``: ``ack``, ``nak``, ``term`` or ``none``, as sent to the
  server through the chain (``none`` for an auto-ack subscription: nats-py acks afterwards);
* ``messaging.nats.nak.delay_s``: the delay of that nak, if any.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Mapping
from typing import Any, overload

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from natsmw.chain import Handler, middleware
from natsmw.headers import peek_header
from natsmw.message import SPAN_KEY, MessageProxy, Report, Settle, Settlement, remove_last

__all__ = ["Tracing", "publish", "with_tracing"]

_SCOPE = "natsmw"
_INBOX = "_INBOX."
_W3C = TraceContextTextMapPropagator()

# What other middlewares report, and the natsmw counter each one feeds.
_COUNTED = {
    "natsmw.delay.capped": "natsmw.delay.capped",
    "natsmw.delay.hold": "natsmw.delay.holds",
    "natsmw.delay.blind_hold": "natsmw.delay.holds",
    "natsmw.delay.survival": "natsmw.delay.survivals",
    "natsmw.delay.parked": "natsmw.delay.parked",
    "natsmw.delay.unparked": "natsmw.delay.unparked",
    "natsmw.guard.rejected": "natsmw.guard.rejections",
}
# Report attributes low enough in cardinality to label a counter with.
_LABELS = ("natsmw.delay.decision", "natsmw.guard.limit", "natsmw.guard.action")


def with_tracing(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> Tracing:
    """Trace and measure every message: a CONSUMER span ``process {subject}`` and metrics.

    Put it outermost, so that the span covers the whole chain and sees what reaches the
    server: ``compose(with_tracing(), with_delay_cap(60))``.

    Args:
        tracer_provider: where spans go; the global tracer provider by default.
        meter_provider: where metrics go; the global meter provider by default.
    """
    return Tracing(tracer_provider=tracer_provider, meter_provider=meter_provider)


class Tracing:
    """The tracing middleware; build it with :func:`with_tracing`."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._sdk_seen = False
        self._labels: dict[object, dict[str, Any]] = {}  # metric labels, by stream
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of processing operation."
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Number of messages that were delivered to the application.",
        )
        self._counters = {
            name: meter.create_counter(name, unit="{message}", description=description)
            for name, description in (
                ("natsmw.delay.capped", "Naks longer than the cap, sent capped."),
                ("natsmw.delay.holds", "Deliveries held until their deadline."),
                ("natsmw.delay.survivals", "Decisions that put a message's survival first."),
                ("natsmw.delay.parked", "Messages parked in the server's scheduler."),
                ("natsmw.delay.unparked", "Parked messages that reached the handler when due."),
                ("natsmw.guard.rejections", "Messages kept from the handler by a size guard."),
            )
        }

    def __call__(self, handler: Handler) -> Handler:
        traced = middleware(self._step)(handler)
        given = self._tracer_provider is not None or self._meter_provider is not None

        @functools.wraps(handler)
        async def handle(msg: Msg) -> None:
            # No provider given nor set globally (the API's own globals, read without a call):
            # no SDK, so not even a proxy; nothing to record or pay.
            if self._sdk_seen:
                await traced(msg)
            elif (
                not given
                and _GLOBALS_READABLE
                and trace._TRACER_PROVIDER is None
                and _metrics_internal._METER_PROVIDER is None
            ):
                await handler(msg)
            elif self._enabled():
                await traced(msg)
            else:
                await handler(msg)

        return handle

    def _enabled(self) -> bool:
        """Whether an SDK is there to receive spans or metrics (either is enough)."""
        if self._sdk_seen:
            return True  # providers, once set, stay set: no need to look again
        self._sdk_seen = self._sdk_found()
        return self._sdk_seen

    def _sdk_found(self) -> bool:
        tracer_provider = self._tracer_provider or trace.get_tracer_provider()
        if not isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return True
        meter_provider = self._meter_provider or metrics.get_meter_provider()
        return not isinstance(meter_provider, metrics.NoOpMeterProvider) and (
            type(meter_provider).__name__ != "_ProxyMeterProvider"  # the API's "none set yet"
        )

    async def _step(self, msg: MessageProxy, call_next: Handler) -> None:
        real = msg.message  # read directly: faster than through the proxy
        destination = _destination(real.subject)
        attributes = _start_attributes(msg, real, destination)
        creation = propagate.extract(real, getter=_HEADERS)
        creation_span = trace.get_current_span(creation).get_span_context()
        links = [Link(creation_span)] if creation_span.is_valid else None
        parent = None
        if creation_span.is_valid and not trace.get_current_span().get_span_context().is_valid:
            parent = creation
        span = self._tracer.start_span(
            f"process {destination}", parent, SpanKind.CONSUMER, attributes, links
        )
        stream = attributes.get("messaging.nats.stream.name")
        labels = self._labels.get(stream)
        if labels is None:
            labels = self._labels[stream] = _metric_labels(attributes)
        recorder = _Recorder(self, span, labels)
        # With the creation context as parent, its baggage comes along to the handler.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        msg.state[SPAN_KEY] = span
        started = time.perf_counter()
        try:
            if span.is_recording():
                with msg.intercept(recorder.settlement), msg.observe(recorder.report):
                    await call_next(msg)
            else:
                # Sampled out: metrics only. What msg.observe() does, without its with
                # block's calls (on every message).
                observers = msg._self_observers
                if observers is None:
                    observers = msg._self_observers = []
                observer = recorder.count
                observers.append(observer)
                try:
                    await call_next(msg)
                finally:
                    remove_last(observers, observer)
        except BaseException as raised:
            recorder.failed(raised)
            raise
        finally:
            otel_context.detach(token)
            recorder.finish(msg, time.perf_counter() - started)


# The API's globals, None until a provider (an SDK's) is set: where a later API renames
# them, the providers are asked on every message instead.
_GLOBALS_READABLE = hasattr(trace, "_TRACER_PROVIDER") and hasattr(
    _metrics_internal, "_METER_PROVIDER"
)


class _Recorder:
    """Records one message's settlement, reports, outcome and metrics on its span."""

    __slots__ = ("_error", "_labels", "_span", "_tracing")

    def __init__(self, tracing: Tracing, span: trace.Span, labels: dict[str, Any]) -> None:
        self._tracing = tracing
        self._span = span
        self._labels = labels
        self._error: str | None = None

    async def settlement(self, settlement: Settlement, send: Settle) -> Any:
        result = await send(settlement)
        if settlement.is_final:
            self._span.set_attribute("messaging.nats.settlement", _settlement_name(settlement))
            if settlement.kind == "nak" and settlement.delay:
                self._span.set_attribute("messaging.nats.nak.delay_s", settlement.delay)
        return result

    def report(self, report: Report) -> None:
        self._span.add_event(report.name, dict(report.attributes))
        if report.link:
            deferring = _W3C.extract({"traceparent": report.link})
            linked = trace.get_current_span(deferring).get_span_context()
            if linked.is_valid:
                self._span.add_link(linked, {"natsmw.link": "deferred_by"})
        self.count(report)

    def count(self, report: Report) -> None:
        counter = _COUNTED.get(report.name)
        if counter is not None:
            labels = {**self._labels}
            labels.update({k: v for k, v in report.attributes.items() if k in _LABELS})
            self._tracing._counters[counter].add(1, labels)

    def failed(self, error: BaseException) -> None:
        self._error = _error_type(error)
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, str(error)))
        self._span.set_attribute("error.type", self._error)

    def finish(self, msg: MessageProxy, elapsed: float) -> None:
        if msg.settlement is None and msg.is_jetstream:
            self._span.set_attribute("messaging.nats.settlement", "none")
        self._span.end()
        labels = self._labels
        if self._error is not None:
            labels = {**labels, "error.type": self._error}
        self._tracing._duration.record(elapsed, labels)
        self._tracing._consumed.add(1, self._labels)


class _HeaderGetter(Getter[Msg]):
    """Reads propagation headers one by one, without decoding the others (lazy headers)."""

    def get(self, carrier: Msg, key: str) -> list[str] | None:
        value = peek_header(carrier, key)
        return None if value is None else [value]

    def keys(self, carrier: Msg) -> list[str]:
        return list(carrier.headers or {})


_HEADERS = _HeaderGetter()


def _destination(subject: str) -> str:
    # Reply inboxes are unique per client or request: a template keeps span names and
    # metric labels few.
    return _INBOX if subject.startswith(_INBOX) else subject


def _start_attributes(msg: MessageProxy, real: Msg, destination: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": destination,
        "messaging.message.body.size": len(real.data),
    }
    if destination == _INBOX:
        attributes["messaging.destination.temporary"] = True
    message_id = peek_header(real, "Nats-Msg-Id")
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    attributes.update(_server_attributes(real._client))
    if msg.is_jetstream:
        position = msg.identity  # a due copy of a parked message: the original's
        attributes["messaging.consumer.group.name"] = position.consumer
        attributes["messaging.nats.stream.name"] = position.stream
        attributes["messaging.nats.message.stream_sequence"] = position.stream_sequence
        attributes["messaging.nats.message.delivery_count"] = position.delivered
    else:
        subscription = getattr(real._client, "_subs", {}).get(real._sid)
        queue = getattr(subscription, "_queue", None)
        if queue:
            attributes["messaging.consumer.group.name"] = queue
    return attributes


_servers: weakref.WeakKeyDictionary[Any, tuple[Any, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _server_attributes(client: Any) -> dict[str, Any]:
    """``server.address`` and ``server.port`` of the server the client is connected to."""
    url = getattr(client, "connected_url", None)
    try:
        known = _servers.get(client)
    except TypeError:  # not weak-referenceable: no cache
        known = None
    if known is not None and known[0] is url:
        return known[1]
    found: dict[str, Any] = {}
    if url is not None and url.hostname:
        found["server.address"] = url.hostname
        if url.port:
            found["server.port"] = url.port
    with contextlib.suppress(TypeError):
        _servers[client] = (url, found)
    return found


def _metric_labels(attributes: Mapping[str, Any]) -> dict[str, Any]:
    # Not the consumer group: ephemeral and ordered consumers have random, changing names.
    keep = ("messaging.system", "messaging.operation.name", "messaging.nats.stream.name")
    return {k: attributes[k] for k in keep if k in attributes}


def _settlement_name(settlement: Settlement) -> str:
    return "ack" if settlement.kind == "ack_sync" else settlement.kind


def _error_type(error: BaseException) -> str:
    kind = type(error)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


@overload
async def publish(
    connection: JetStreamContext,
    subject: str,
    payload: bytes = ...,
    *,
    headers: Mapping[str, str] | None = ...,
    tracer_provider: TracerProvider | None = ...,
    **publish_options: Any,
) -> PubAck: ...


@overload
async def publish(
    connection: Client,
    subject: str,
    payload: bytes = ...,
    *,
    headers: Mapping[str, str] | None = ...,
    tracer_provider: TracerProvider | None = ...,
    **publish_options: Any,
) -> None: ...


async def publish(
    connection: Client | JetStreamContext,
    subject: str,
    payload: bytes = b"",
    *,
    headers: Mapping[str, str] | None = None,
    tracer_provider: TracerProvider | None = None,
    **publish_options: Any,
) -> PubAck | None:
    """Publish with a PRODUCER span ``send {subject}``, its context injected into the headers.

    ``connection`` is a client (core NATS, returns ``None``) or a JetStream context (returns
    the ``PubAck``). Consumers traced with :func:`with_tracing` link to this span.

    Raises:
        Whatever ``publish`` of ``connection`` raises; the span records it.
    """
    tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
    destination = _destination(subject)
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": destination,
        "messaging.message.body.size": len(payload),
    }
    carrier = dict(headers or {})
    if "Nats-Msg-Id" in carrier:
        attributes["messaging.message.id"] = carrier["Nats-Msg-Id"]
    with tracer.start_as_current_span(
        f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        propagate.inject(carrier)
        if isinstance(connection, JetStreamContext):
            ack: PubAck = await connection.publish(
                subject, payload, headers=carrier, **publish_options
            )
            span.set_attribute("messaging.nats.stream.name", ack.stream)
            span.set_attribute("messaging.nats.message.stream_sequence", ack.seq)
            return ack
        await connection.publish(subject, payload, headers=carrier or None, **publish_options)
        return None
