"""Zero-code tracing for nats-py: natsmw's OpenTelemetry instrumentor.

With ``pip install 'natsmw[instrument]' opentelemetry-distro`` (and an exporter), an
application that uses plain nats-py is traced through natsmw without a change to its code::

    OTEL_SERVICE_NAME=orders opentelemetry-instrument python app.py

or, in code, before the application connects::

    from natsmw.instrumentation import NatsmwInstrumentor

    NatsmwInstrumentor().instrument(tracer_provider=..., meter_provider=...)

While instrumented:

* every client that connects gets ``install(nc, lazy_headers=False, chain=with_tracing(...))``:
  the callbacks of its subscriptions (core and JetStream push) and the messages its pull
  subscriptions ``fetch`` get natsmw's CONSUMER ``process`` spans and its metrics;
* every publish, ``Client.publish`` and ``JetStreamContext.publish`` of any client, opens a
  PRODUCER span ``send {subject}`` and injects its context into the headers, as
  [`natsmw.publish`][natsmw.publish] does. Subjects starting with ``$`` (acks, the JetStream API,
  key-value and object stores) are nats-py's and the server's own, and are not traced; nor is
  a publish whose headers already carry the current span's context (``natsmw.publish``, or
  code that traces its publishes itself);
* ``natsmw.install(nc, chain=...)`` puts the instrumentor's tracing in front of that chain
  (and takes the instrumentor's own install out of its way on an instrumented client).

A callback with a ``with_tracing()`` of its own gets one ``process`` span: a message already
inside a ``with_tracing`` passes through any further one.

Clients connected before ``instrument()`` keep their consumers as they are (their publishes
are traced): install on them yourself, ``install(nc, chain=with_tracing())``.

``uninstrument()`` undoes it all: nats-py's classes and ``natsmw.install`` are restored and the
clients the instrumentor installed on are uninstalled. Subscriptions made meanwhile keep
natsmw's wrapper until they are unsubscribed (as after [`natsmw.uninstall`][natsmw.uninstall]),
passing every message straight through, without a span.

Importing this module needs ``opentelemetry-instrumentation``; the rest of natsmw does not.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import wrapt
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import propagate, trace

# The module is typed, but says `# type: ignore` at its top: mypy sees none of its names.
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

import natsmw
import natsmw.installation
from natsmw.chain import Handler, Middleware, compose
from natsmw.errors import NatsmwError
from natsmw.installation import SUPPORTED_NATS_PY, install, uninstall
from natsmw.tracing import publish, with_tracing

__all__ = ["NatsmwInstrumentor"]

log = logging.getLogger("natsmw.instrumentation")

# Set while the instrumentor's own publish runs: the publish natsmw.publish makes in turn
# (and the core one inside a JetStream publish) is the same message, not another send.
# natsmw's own subjects (park and due schedules, clock probes, dead-letter copies): their
# headers carry the original message's trace context, which a send span would replace.
_NATSMW_OWN = "natsmw."
_sending: contextvars.ContextVar[bool] = contextvars.ContextVar("natsmw_sending", default=False)


class NatsmwInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces nats-py consumers and publishers through natsmw; see
    [`natsmw.instrumentation`][natsmw.instrumentation].

    ``instrument(tracer_provider=..., meter_provider=...)`` takes where spans and metrics go
    (the global providers by default); ``opentelemetry-instrument`` calls it with neither.
    Like every OpenTelemetry instrumentor, it is a singleton: ``NatsmwInstrumentor()`` is
    always the same object.

    Example:
        ```python
        NatsmwInstrumentor().instrument(tracer_provider=provider)
        nc = await nats.connect(url)          # consumers of nc are traced
        await nc.publish("orders.new", body)  # a PRODUCER span, its context in the headers
        NatsmwInstrumentor().uninstrument()
        ```

    """

    _instrumentation: _Instrumentation | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return (f"nats-py {SUPPORTED_NATS_PY}",)

    def _instrument(self, **kwargs: Any) -> None:
        self._instrumentation = _Instrumentation(
            tracer_provider=kwargs.get("tracer_provider"),
            meter_provider=kwargs.get("meter_provider"),
        )
        self._instrumentation.start()

    def _uninstrument(self, **kwargs: Any) -> None:
        instrumentation, self._instrumentation = self._instrumentation, None
        if instrumentation is not None:
            instrumentation.stop()


class _Instrumentation:
    """What one ``instrument()`` patched, and the clients it installed natsmw on."""

    def __init__(
        self, *, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        self.active = True
        self._tracer_provider = tracer_provider
        self._tracing = with_tracing(tracer_provider=tracer_provider, meter_provider=meter_provider)
        # The chain installed on clients, one object: an installation with it is ours.
        self._chain: Middleware = self._traced
        self._clients: weakref.WeakSet[Client] = weakref.WeakSet()
        self._patches: list[tuple[object, str, wrapt.FunctionWrapper[Any, Any]]] = []

    def start(self) -> None:
        """Patch nats-py's connect and publishes, and natsmw's install."""
        self._patch(Client, "connect", self._connecting)
        self._patch(Client, "publish", _publishing(self, Client.publish))
        self._patch(JetStreamContext, "publish", _publishing(self, JetStreamContext.publish))
        for module in (natsmw.installation, natsmw):
            self._patch(module, "install", self._installing)

    def stop(self) -> None:
        """Restore what was patched and uninstall natsmw from the clients it was put on."""
        self.active = False
        for owner, name, ours in reversed(self._patches):
            # Wrapped again by someone else since: ours stays under theirs, and passes calls
            # straight through now that it is inactive.
            if vars(owner).get(name) is ours:
                setattr(owner, name, ours.__wrapped__)
        self._patches.clear()
        for nc in list(self._clients):
            if self._owns(nc):
                uninstall(nc)
        self._clients.clear()

    def _patch(self, owner: object, name: str, wrapper: Any) -> None:
        self._patches.append((owner, name, wrapt.wrap_function_wrapper(owner, name, wrapper)))

    def _traced(self, handler: Handler) -> Handler:
        """The instrumentor's middleware: natsmw's tracing while instrumented, then nothing."""
        traced = self._tracing(handler)

        @functools.wraps(handler)
        async def handle(msg: Msg) -> None:
            if self.active:
                await traced(msg)
            else:
                await handler(msg)

        return handle

    def _owns(self, nc: Client) -> bool:
        """Whether natsmw is installed on ``nc`` by this instrumentation (not by the user)."""
        installation = natsmw.installation._installed.get(nc)
        return installation is not None and installation.chain is self._chain

    def _install(self, nc: Client) -> None:
        try:
            install(nc, lazy_headers=False, chain=self._chain)
        except NatsmwError:
            return  # installed already: by the user, with the tracing in front of their chain
        self._clients.add(nc)

    def _connecting(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.active:
            self._install(instance)
        return wrapped(*args, **kwargs)

    def _installing(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``natsmw.install`` while instrumented: the user's install, tracing outermost."""
        if not self.active:
            return wrapped(*args, **kwargs)
        nc = args[0] if args else kwargs.get("nc")
        chain = kwargs.get("chain")
        if chain is None:
            kwargs = {**kwargs, "chain": compose(self._chain)}  # ours in effect, not by identity
        elif callable(chain):
            kwargs = {**kwargs, "chain": compose(self._chain, chain)}
        replacing = nc if isinstance(nc, Client) and self._owns(nc) else None
        if replacing is not None:
            log.debug("natsmw.install on %r: the instrumentor's own install makes way", nc)
            uninstall(replacing)
        try:
            return wrapped(*args, **kwargs)
        except BaseException:
            if replacing is not None:
                self._install(replacing)  # the user's install failed: the client stays traced
            raise

    async def send(
        self,
        connection: Client | JetStreamContext,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        options: dict[str, Any],
    ) -> Any:
        """Publish through [`natsmw.publish`][natsmw.publish]; its own call of ``publish`` goes
        through."""
        token = _sending.set(True)
        try:
            return await publish(
                connection,
                subject,
                payload,
                headers=headers,
                tracer_provider=self._tracer_provider,
                **options,
            )
        finally:
            _sending.reset(token)


def _publishing(
    instrumentation: _Instrumentation, original: Callable[..., Awaitable[Any]]
) -> Callable[..., Any]:
    """The wrapper of ``original``, a ``publish`` of nats-py's: a PRODUCER span, through
    natsmw's own ``publish``, unless the message is nats-py's own or traced already."""
    names = list(inspect.signature(original).parameters)[1:]  # subject, payload, ... (no self)

    def publishing(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        subject = args[0] if args else kwargs.get("subject")
        if (
            type(subject) is not str
            or subject.startswith("$")  # acks first: one for every JetStream message
            or subject.startswith(_NATSMW_OWN)  # natsmw's own traffic (parking, clock probes)
            or not instrumentation.active
            or _sending.get()
            or not is_instrumentation_enabled()
            or len(args) > len(names)  # a call nats-py refuses: let it, as without us
        ):
            return wrapped(*args, **kwargs)
        arguments = {**dict(zip(names, args, strict=False)), **kwargs}
        del arguments["subject"]
        payload = arguments.pop("payload", b"")
        headers = arguments.pop("headers", None)
        if headers and _traced_already(headers):
            return wrapped(*args, **kwargs)
        return instrumentation.send(instance, subject, payload, headers, arguments)

    return publishing


def _traced_already(headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` carry the current span's context: whoever opened that span has
    traced this publish (``natsmw.publish``, or the application itself)."""
    current = trace.get_current_span().get_span_context()
    if not current.is_valid:
        return False
    carried = trace.get_current_span(propagate.extract(headers)).get_span_context()
    return carried.span_id == current.span_id and carried.trace_id == current.trace_id
