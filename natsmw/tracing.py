"""OpenTelemetry spans and metrics that answer "why did this message run late?".

``with_tracing()`` opens a CONSUMER span ``process {subject}`` around each message, with the
messaging semantic conventions (semconv 1.44) set at span start, and turns what the other
natsmw middlewares report (caps, holds, survival decisions, guard rejections) into span
events and counters. When the handler finally runs after a deferral, its span links to the
span that asked for the delay.

natsmw depends on ``opentelemetry-api`` only: with no SDK configured, the middleware passes
messages straight through.

Attributes beyond the conventions, all under ``natsmw.*``:

* ``natsmw.stream.name``: the JetStream stream;
* ``natsmw.message.stream_sequence``: the message's sequence in that stream;
* ``natsmw.message.delivery_count``: ``num_delivered``, holds included;
* ``natsmw.settlement``: ``ack``, ``nak``, ``term`` or ``none``, as sent to the
  server through the chain (``none`` for an auto-ack subscription: nats-py acks afterwards);
* ``natsmw.nak.delay_s``: the delay of that nak, if any.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.metrics import MeterProvider
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from natsmw.claim import ClaimCheck
from natsmw.chain import _ENTRY, _UNBOUND, Decorator, Handler, bound, layer
from natsmw.headers import peek_header
from natsmw.message import (
    _JS_ACK_PREFIX,
    PROXY_TYPES,
    RUNS_ELSEWHERE,
    SPAN_KEY,
    MessageProxy,
    Report,
    Settle,
    Settlement,
    StandInMsg,
    capped_by,
    remove_last,
)

__all__ = ["Tracing", "publish", "with_tracing"]

_SCOPE = "natsmw"
# msg.state key: the message is inside a with_tracing already, which has its span.
_TRACED = "natsmw.traced"
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


class Tracing(Decorator):
    """The tracing middleware; build it with [`with_tracing`][with_tracing]."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._sdk_seen = False
        self._judged: tuple[object, object] | None = None  # the global providers judged
        # Per subscription (client id, sid; stream and consumer on JetStream): the server it
        # was read from, the attributes every message shares, the metric labels.
        self._static: dict[tuple[object, ...], _Static] = {}
        self._templates: dict[tuple[int, str, str], str] = {}  # by (client id, stream, consumer)
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing operation.",
            # The conventions' advice: the SDK's default bounds (0, 5, 10, 25, ...) are
            # meant for milliseconds and would put every run under 5 s in one bucket.
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
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

    def _wrap(self, handler: Handler) -> Handler:
        # Around a delay cap, a delivery's span opens only when the handler is about to run
        # (or something other than a hold happened): holds are settlements, not processing,
        # and a 3 h deferral at a 1 min cap would otherwise be 180 process spans.
        if capped_by(handler) is not None:
            step = self._deferred_step
        elif getattr(handler, RUNS_ELSEWHERE, False):
            step = self._fetched_step  # the user's handler runs after fetch: holds may come
        else:
            step = self._step
        traced = layer(step)(handler)
        # The layer's own entry, for a message that is a proxy already (made here): the
        # step's coroutine, without the layer's handle around it (on every message).
        entry = getattr(traced, _ENTRY)[1]
        given = self._tracer_provider is not None or self._meter_provider is not None

        @functools.wraps(handler)
        async def handle(msg: Msg, bound_msg: Msg = _UNBOUND) -> None:
            # No provider given nor set globally (the API's own globals, read without a call):
            # no SDK, so not even a proxy; nothing to record or pay.
            if self._sdk_seen or (
                not (
                    not given
                    and _GLOBALS_READABLE
                    and trace._TRACER_PROVIDER is None
                    and _metrics_internal._METER_PROVIDER is None
                )
                and self._enabled()
            ):
                if bound_msg is _UNBOUND:
                    kind = type(msg)
                    if kind not in PROXY_TYPES:
                        msg = MessageProxy(msg) if kind is Msg else MessageProxy.of(msg)
                    await entry(msg)
                else:  # decorated in a class body, called as a method: msg is the instance
                    await traced(msg, bound_msg)  # type: ignore[call-arg]
            elif bound_msg is _UNBOUND:
                await handler(msg)
            else:
                await bound(handler, msg)(bound_msg)

        return handle

    def _enabled(self) -> bool:
        """Whether an SDK is there to receive spans or metrics (either is enough). Decided
        once per pair of global providers: asked again only when one of them is set."""
        if self._sdk_seen:
            return True  # providers, once set, stay set: no need to look again
        providers = _global_providers()
        if providers is not None and providers == self._judged:
            return False
        self._sdk_seen = self._sdk_found()
        self._judged = providers
        return self._sdk_seen

    def _sdk_found(self) -> bool:
        tracer_provider = self._tracer_provider or trace.get_tracer_provider()
        if not isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return True
        meter_provider = self._meter_provider
        if meter_provider is None:
            providers = _global_providers()
            if providers is None:  # an API whose globals natsmw cannot read: ask it
                meter_provider = metrics.get_meter_provider()
                return not isinstance(meter_provider, metrics.NoOpMeterProvider) and (
                    type(meter_provider).__name__ != "_ProxyMeterProvider"  # none set yet
                )
            if providers[1] is None:
                return False  # none set: the API's proxy, which records nothing
            return not isinstance(providers[1], metrics.NoOpMeterProvider)
        return not isinstance(meter_provider, metrics.NoOpMeterProvider)

    def _start_attributes(
        self, msg: MessageProxy, real: Msg, destination: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The span's start attributes and the metric labels of one delivery.

        What every message of a subscription shares (on JetStream, of its stream and
        consumer too) is built once and kept; the rest is added per message.
        """
        known, jetstream, sequence, delivered = self._shared(msg, real)
        attributes = {
            **known[1],
            "messaging.destination.name": destination,
            "messaging.message.body.size": len(real.data),
        }
        if destination == _INBOX:
            attributes["messaging.destination.temporary"] = True
        if type(real) is Msg:
            headers = real.headers
            message_id = headers.get("Nats-Msg-Id") if headers else None
        else:
            message_id = peek_header(real, "Nats-Msg-Id")
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        if jetstream:
            attributes["natsmw.message.stream_sequence"] = sequence
            attributes["natsmw.message.delivery_count"] = delivered
        return attributes, known[2]

    def _shared(self, msg: MessageProxy, real: Msg) -> tuple[_Static, bool, int, int]:
        """What the delivery's subscription shares (kept), whether it is a JetStream one,
        and the message's stream sequence and delivery count there."""
        client = real._client
        reply = real.reply
        jetstream = reply.startswith(_JS_ACK_PREFIX) if reply else False
        stream: str | None = None
        consumer: str | None = None
        sequence = delivered = 0
        if jetstream:
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
            tokens = reply.split(".")
            if len(tokens) == 9 and (type(real) is Msg or not isinstance(real, StandInMsg)):
                stream, consumer = tokens[2], tokens[3]
                sequence, delivered = int(tokens[5]), int(tokens[4])
            else:  # a domain, or a due copy of a parked message: the original's position
                stream, consumer, sequence, delivered = msg.identity
            key: tuple[object, ...] = (id(client), real._sid, stream, consumer)
        else:
            key = (id(client), real._sid)
        server = getattr(client, "_current_server", None)  # a reconnect may change it
        known = self._static.get(key)
        if known is None or known[0] is not server:
            known = self._remember(key, client, real, server, stream, consumer)
        return known, jetstream, sequence, delivered

    def _count(self, report: Report, labels: dict[str, Any]) -> None:
        """Count ``report`` on its natsmw counter, if it has one, with the delivery's metric
        labels and those of the report's own attributes that are few."""
        counter = _COUNTED.get(report.name)
        if counter is None:
            return
        counted = {**labels}
        counted.update({k: v for k, v in report.attributes.items() if k in _LABELS})
        self._counters[counter].add(1, counted)

    def _remember(
        self,
        key: tuple[object, ...],
        client: Client,
        real: Msg,
        server: object,
        stream: str | None,
        consumer: str | None,
    ) -> _Static:
        static: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
        }
        url = getattr(server, "uri", None)
        if url is not None and url.hostname:
            static["server.address"] = url.hostname
            if url.port:
                static["server.port"] = url.port
        subscription = getattr(client, "_subs", {}).get(real._sid)
        if consumer is not None:
            static["messaging.consumer.group.name"] = consumer
            static["natsmw.stream.name"] = stream
        else:
            queue = getattr(subscription, "_queue", None)
            if queue:
                static["messaging.consumer.group.name"] = queue
        template = _template(subscription)
        if consumer is not None and stream is not None:
            # A due copy of a parked message comes through natsmw's own pull: it takes the
            # template its consumer's own deliveries had here.
            consumer_key = (id(client), stream, consumer)
            if template is None:
                template = self._templates.get(consumer_key)
            elif len(self._templates) < _STATIC_KEPT:
                self._templates[consumer_key] = template
        if template is not None:
            static["messaging.destination.template"] = template
        # Not the consumer group: ephemeral and ordered consumers have random, changing names.
        labels = {name: static[name] for name in _METRIC_LABELS if name in static}
        if len(self._static) >= _STATIC_KEPT:
            self._static.clear()  # subscriptions come and go; the live ones come back at once
        known = self._static[key] = (server, static, labels)
        return known

    async def _step(self, msg: MessageProxy, call_next: Handler) -> None:
        state = msg._self_state
        if state is None:
            state = msg._self_state = {}
        elif _traced_already(state):
            await call_next(msg)  # inside another with_tracing (the instrumentor's): its span
            return
        span, parent, labels = self._open(msg, (), None, None)
        recorder = _Recorder(self, span, labels)
        # With the creation context as parent, its baggage comes along to the handler.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        state[SPAN_KEY] = span
        state[_TRACED] = span  # an inner with_tracing under this span passes through
        started = time.perf_counter()
        try:
            if span.is_recording():
                with msg.intercept(recorder.settlement), msg.observe(recorder.report):
                    await call_next(msg)
            else:
                # Sampled out: metrics only. What msg.observe() does, without its with
                # block's calls (on every message).
                observer = recorder.count
                observers = msg._self_observers
                if observers is None:
                    observers = msg._self_observers = [observer]
                else:
                    observers.append(observer)
                try:
                    await call_next(msg)
                finally:
                    if observers and observers[-1] is observer:
                        del observers[-1]
                    else:
                        remove_last(observers, observer)
        except BaseException as raised:
            recorder.failed(raised)
            raise
        finally:
            otel_context.detach(token)
            state.pop(_TRACED, None)
            recorder.finish(msg, time.perf_counter() - started)

    async def _deferred_step(self, msg: MessageProxy, call_next: Handler) -> None:
        """The step around a delay cap: the span waits for the handler's run."""
        await self._lazily(msg, call_next, covers_run=True)

    async def _fetched_step(self, msg: MessageProxy, call_next: Handler) -> None:
        """The step of install's pull fetch: the span opens when the message is settled,
        unless the handler's own delay cap held it (the handler runs after fetch, outside
        this span: a with_tracing of its own traces the run)."""
        await self._lazily(msg, call_next, covers_run=False)

    async def _lazily(self, msg: MessageProxy, call_next: Handler, *, covers_run: bool) -> None:
        state = msg._self_state
        if state is None:
            state = msg._self_state = {}
        elif _traced_already(state):
            await call_next(msg)  # inside another with_tracing (the instrumentor's): its span
            return
        if covers_run:
            state[_TRACED] = _OPENS_AT_RUN  # the span opens later, around the run
        delivery = _Delivery(self, msg)
        previous = msg._self_on_run
        msg._self_on_run = delivery.open if previous is None else _both(previous, delivery.open)
        observers = msg._self_observers
        if observers is None:
            observers = msg._self_observers = []
        observer = delivery.report  # one bound method: removed by identity below
        observers.append(observer)
        try:
            await call_next(msg)
        except BaseException as raised:
            delivery.failed(raised)
            raise
        finally:
            remove_last(observers, observer)
            msg._self_on_run = previous
            if covers_run:
                state.pop(_TRACED, None)
            delivery.finish()

    def _open(
        self,
        msg: MessageProxy,
        links: Sequence[Link],
        more: dict[str, Any] | None,
        start_time: int | None,
    ) -> tuple[trace.Span, otel_context.Context | None, dict[str, Any]]:
        """Start a delivery's span (not made current): the span, its parent context (the
        creation context when there is no ambient span) and the metric labels. ``links``
        and ``more`` attributes go on it at start, where samplers see them."""
        real = msg.__wrapped__  # read directly: faster than through the proxy
        subject = real.subject
        destination = _INBOX if subject.startswith(_INBOX) else subject
        attributes, labels = self._start_attributes(msg, real, destination)
        if more:
            attributes.update(more)
        parent = None
        if _carries_context(real):
            creation = propagate.extract(real, getter=_HEADERS)
            creation_span = trace.get_current_span(creation).get_span_context()
            if creation_span.is_valid:
                links = [Link(creation_span), *links]
                if not trace.get_current_span().get_span_context().is_valid:
                    parent = creation
        # The subscription's subject (a wildcard, a JetStream consumer's filter) keeps span
        # names few; the message's own subject is messaging.destination.name.
        template = attributes.get("messaging.destination.template") or destination
        span = self._tracer.start_span(
            f"process {template}", parent, SpanKind.CONSUMER, attributes, links or None,
            start_time=start_time,
        )  # fmt: skip
        return span, parent, labels


def _both(first: OnRun, second: OnRun) -> OnRun:
    def both() -> Callable[[], None] | None:
        after_first, after_second = first(), second()
        if after_first is None or after_second is None:
            return after_first or after_second

        def after() -> None:
            after_second()
            after_first()

        return after

    return both


def _traced_already(state: dict[object, Any]) -> bool:
    """Whether an outer with_tracing covers this delivery: one whose span opens around the
    handler's run, or whose span is the current one (a span opened elsewhere, as around a
    pull fetch, does not cover the handler: the inner one opens its own)."""
    marker = state.get(_TRACED)
    if marker is None:
        return False
    return marker is _OPENS_AT_RUN or marker is trace.get_current_span()


_OPENS_AT_RUN = object()
OnRun = Callable[[], Callable[[], None] | None]


class _Delivery:
    """One delivery through a tracing around a delay cap. Its span opens when the handler
    is about to run, or at the end when the delivery was neither run nor held (a guard
    rejected it, a parked original was acked): a hold makes no span, only its counter.

    Reports that come before the span are kept for it: the link to the span that asked
    for the delay, and the deferral's figures, are on the span from its start, where
    samplers see them.
    """

    __slots__ = (
        "_arrived", "_error", "_held", "_interception", "_labels", "_msg", "_parent",
        "_pending", "_span", "_started", "_tracing",
    )  # fmt: skip

    def __init__(self, tracing: Tracing, msg: MessageProxy) -> None:
        self._tracing = tracing
        self._msg = msg
        self._arrived = time.time_ns()
        self._started = time.perf_counter()
        self._span: trace.Span | None = None
        self._parent: otel_context.Context | None = None
        self._labels: dict[str, Any] = {}
        self._pending: list[tuple[Report, int]] = []
        self._held = False
        self._error: str | None = None
        self._interception: Any = None

    def open(self) -> Callable[[], None] | None:
        """Open the span as the handler is about to run, and make it current; return what
        makes it current no more, to be called in the same frame once the handler is done."""
        if self._span is not None:
            return None
        self._start()
        span = self._span
        assert span is not None
        # With the creation context as parent, its baggage comes along to the handler.
        token = otel_context.attach(trace.set_span_in_context(span, self._parent))
        return lambda: otel_context.detach(token)

    def _start(self) -> None:
        links: list[Link] = []
        more: dict[str, Any] = {}
        for report, _ in self._pending:
            if report.link:
                linked = _linked(report.link)
                if linked is not None:
                    links.append(Link(linked, {"natsmw.link": "deferred_by"}))
            if report.name in _DEFERRAL_REPORTS:
                more.update(
                    (f"natsmw.deferral.{name.rsplit('.', 1)[-1]}", value)
                    for name, value in report.attributes.items()
                    if name in _DEFERRAL_FIGURES
                )
        msg = self._msg
        span, self._parent, self._labels = self._tracing._open(msg, links, more, self._arrived)
        self._span = span
        for report, at in self._pending:
            span.add_event(report.name, dict(report.attributes), timestamp=at)
        self._pending.clear()
        state = msg._self_state
        if state is None:
            state = msg._self_state = {}
        state[SPAN_KEY] = span
        if span.is_recording():
            # The outermost interceptor (tracing is the outermost middleware): it sees what
            # reaches the server, after the delay cap has capped or parked a nak.
            interceptors = msg._self_interceptors
            if interceptors is None:
                interceptors = msg._self_interceptors = []
            self._interception = (self.settlement, None)
            interceptors.insert(0, self._interception)

    async def settlement(self, settlement: Settlement, send: Settle) -> Any:
        result = await send(settlement)
        span = self._span
        if span is not None and settlement.is_final:
            span.set_attribute("natsmw.settlement", _settlement_name(settlement))
            if settlement.kind == "nak" and settlement.delay:
                span.set_attribute("natsmw.nak.delay_s", settlement.delay)
        return result

    def report(self, report: Report) -> None:
        labels = self._labels
        if not labels:  # before the span: a hold, most often (the labels are kept, cheap)
            msg = self._msg
            labels = self._labels = self._tracing._shared(msg, msg.__wrapped__)[0][2]
        self._tracing._count(report, labels)
        span = self._span
        if span is not None:
            span.add_event(report.name, dict(report.attributes))
            if report.link:
                linked = _linked(report.link)
                if linked is not None:
                    span.add_link(linked, {"natsmw.link": "deferred_by"})
        elif report.name in _HOLD_REPORTS:
            self._held = True  # what came before it (a stretched hold's survival) was about it
        else:
            self._pending.append((report, time.time_ns()))

    def failed(self, error: BaseException) -> None:
        if self._span is None:
            if self._held:
                return  # failed in a hold (its nak, a drain): the hold's counter says so
            self._start()
        assert self._span is not None
        self._error = _error_type(error)
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, str(error)))
        self._span.set_attribute("error.type", self._error)

    def finish(self) -> None:
        msg = self._msg
        if self._span is None:
            if self._held:
                return  # a hold: its counters were counted, no span and no consumed message
            # Neither run nor held (a guard's rejection, a parked original acked): settled
            # already, before the span, which says how.
            self._start()
            settlement = msg.settlement
            if settlement is not None and self._span is not None:
                self._span.set_attribute("natsmw.settlement", _settlement_name(settlement))
                if settlement.kind == "nak" and settlement.delay:
                    self._span.set_attribute("natsmw.nak.delay_s", settlement.delay)
        span = self._span
        assert span is not None
        if self._interception is not None and msg._self_interceptors:
            remove_last(msg._self_interceptors, self._interception)
        if msg.settlement is None and msg.is_jetstream:
            span.set_attribute("natsmw.settlement", "none")
        span.end()
        labels = self._labels
        if self._error is not None:
            labels = {**labels, "error.type": self._error}
        tracing = self._tracing
        tracing._duration.record(time.perf_counter() - self._started, labels)
        tracing._consumed.add(1, self._labels)


def _linked(traceparent: str) -> trace.SpanContext | None:
    deferring = _W3C.extract({"traceparent": traceparent})
    linked = trace.get_current_span(deferring).get_span_context()
    return linked if linked.is_valid else None


_HOLD_REPORTS = frozenset(("natsmw.delay.hold", "natsmw.delay.blind_hold"))
# The reports a run after a deferral starts with, and what of them goes on its span.
_DEFERRAL_REPORTS = frozenset(("natsmw.delay.released", "natsmw.delay.unparked"))
_DEFERRAL_FIGURES = frozenset((
    "natsmw.delay.deadline", "natsmw.delay.held_deliveries", "natsmw.delay.late_s",
    "natsmw.delay.handler_calls_before",
))  # fmt: skip


# The API's globals, None until a provider (an SDK's) is set: where a later API renames
# them, the providers are asked on every message instead.
_GLOBALS_READABLE = hasattr(trace, "_TRACER_PROVIDER") and hasattr(
    _metrics_internal, "_METER_PROVIDER"
)


def _template(subscription: object) -> str | None:
    """The low-cardinality destination a subscription's messages share: its subject (core,
    wildcards and all), or its JetStream consumer's filter subject where the subscription
    knows it (push); ``None`` for reply inboxes and pull subscriptions, whose subscription
    subject is an inbox (their span names keep the message's subject)."""
    jsi = getattr(subscription, "_jsi", None)
    if jsi is not None:
        config = getattr(jsi, "_ccreq", None)
        filtered = getattr(config, "filter_subject", None)
        return filtered if isinstance(filtered, str) and filtered else None
    subject = getattr(subscription, "subject", None)
    if not isinstance(subject, str) or not subject or subject.startswith(_INBOX):
        return None
    return subject


def _global_providers() -> tuple[object, object] | None:
    """The tracer and meter providers set globally (``None`` each until one is set), or
    ``None`` where this API's globals cannot be read."""
    if not _GLOBALS_READABLE:
        return None
    return (trace._TRACER_PROVIDER, _metrics_internal._METER_PROVIDER)


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
            self._span.set_attribute("natsmw.settlement", _settlement_name(settlement))
            if settlement.kind == "nak" and settlement.delay:
                self._span.set_attribute("natsmw.nak.delay_s", settlement.delay)
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
        self._tracing._count(report, self._labels)

    def failed(self, error: BaseException) -> None:
        self._error = _error_type(error)
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, str(error)))
        self._span.set_attribute("error.type", self._error)

    def finish(self, msg: MessageProxy, elapsed: float) -> None:
        if msg.settlement is None and msg.is_jetstream:
            self._span.set_attribute("natsmw.settlement", "none")
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


def _carries_context(real: Msg) -> bool:
    """Whether the message may carry a trace context: it has headers and, as a plain
    message, one the global propagator reads (most carry none: nothing to extract)."""
    if type(real) is not Msg:
        return True  # lazy headers: the propagator peeks at what it reads
    headers = real.headers
    if not headers:
        return False
    global _fields  # one propagator's verdict, made again only when it changes
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, _fields_read(textmap))
    fields = _fields[1]
    return fields is None or not fields.isdisjoint(headers)


def _fields_read(textmap: object) -> frozenset[str] | None:
    """The headers ``textmap`` reads, where known: the W3C propagators (the default) read
    the fields they list. Others may read more than ``fields`` lists (B3 reads ``b3``,
    which it does not list): ``None``, every message with headers is handed to them."""
    parts = getattr(textmap, "_propagators", [textmap])  # a composite's, or itself
    if all(type(part) in _W3C_PROPAGATORS for part in parts):
        return frozenset().union(*(part.fields for part in parts))
    return None


_W3C_PROPAGATORS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_fields: tuple[object, frozenset[str] | None] = (object(), None)


_Static = tuple[object, dict[str, Any], dict[str, Any]]
_STATIC_KEPT = 4096
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_METRIC_LABELS = (
    "messaging.system",
    "messaging.operation.name",
    "messaging.destination.template",
    "natsmw.stream.name",
    "server.address",
)


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
    claim_check: ClaimCheck | None = ...,
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
    claim_check: ClaimCheck | None = ...,
    **publish_options: Any,
) -> None: ...


async def publish(
    connection: Client | JetStreamContext,
    subject: str,
    payload: bytes = b"",
    *,
    headers: Mapping[str, str] | None = None,
    tracer_provider: TracerProvider | None = None,
    claim_check: ClaimCheck | None = None,
    **publish_options: Any,
) -> PubAck | None:
    """Publish with a PRODUCER span ``send {subject}``, its context injected into the headers.

    ``connection`` is a client (core NATS, returns ``None``) or a JetStream context (returns
    the ``PubAck``). Consumers traced with [`with_tracing`][with_tracing] link to this span.
    Whatever ``publish`` of ``connection`` raises is raised as it is; the span records it.

    With ``claim_check`` (a [`ClaimCheck`][natsmw.ClaimCheck]), a body over its threshold is
    stored in the object store first and the message carries a ``Natsmw-Claim`` header and
    an empty body; if the message then cannot be published, the object is deleted again.

    Raises:
        nats.errors.Error, asyncio.TimeoutError: with ``claim_check``, the body could not be
            stored (nothing was published).
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
        claim = js = None
        if claim_check is not None and not hasattr(claim_check, "check_in"):
            raise TypeError(f"claim_check must be a natsmw.ClaimCheck, got {claim_check!r}")
        if claim_check is not None and len(payload) > claim_check.threshold:
            js = connection if isinstance(connection, JetStreamContext) else connection.jetstream()
            payload, carrier, claim = await claim_check.check_in(js, subject, payload, carrier)
            if claim is not None:
                span.set_attribute("natsmw.claim.bucket", claim.bucket)
        propagate.inject(carrier)
        try:
            if isinstance(connection, JetStreamContext):
                ack: PubAck = await connection.publish(
                    subject, payload, headers=carrier, **publish_options
                )
                span.set_attribute("natsmw.stream.name", ack.stream)
                span.set_attribute("natsmw.message.stream_sequence", ack.seq)
                return ack
            await connection.publish(subject, payload, headers=carrier or None, **publish_options)
            return None
        except Exception as error:
            # A timeout may come after the server stored the message: its object stays.
            stored_maybe = isinstance(error, (asyncio.TimeoutError, NatsTimeoutError))
            if claim is not None and claim_check is not None and js and not stored_maybe:
                await claim_check.discard(js, claim)
            raise
