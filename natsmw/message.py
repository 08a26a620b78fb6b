"""The one message proxy that every natsmw middleware shares.

nats-py hands a handler a `nats.aio.msg.Msg`. natsmw wraps it once, in a
[`MessageProxy`][MessageProxy], so that middlewares can

* see, rewrite or replace the settlement calls the handler makes (``ack``, ``ack_sync``,
  ``nak``, ``term``, ``in_progress``), through [`MessageProxy.intercept`][MessageProxy.intercept];
* carry per-message state from one middleware to the next, in
[`MessageProxy.state`][MessageProxy.state];
* tell observers (tracing) what they did, with [`MessageProxy.report`][MessageProxy.report].

Everything else (``data``, ``subject``, ``headers``, ``metadata``, ``respond`` ...) passes
through to the real message, and ``isinstance(proxy, Msg)`` stays true. Settling the proxy
settles the real message, so nats-py's own bookkeeping (``_ackd``, the auto-ack of push
subscriptions with ``manual_ack=False``) sees what happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import (
    Any,
    Generic,
    Literal,
    NamedTuple,
    TypeAlias,
    TypeVar,
    get_args,
)

from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError

from natsmw.duration import Duration, to_seconds

log = logging.getLogger("natsmw")

__all__ = [
    "SPAN_KEY",
    "Interceptor",
    "MessageProxy",
    "Observer",
    "Position",
    "Report",
    "Settle",
    "Settlement",
    "SettlementKind",
    "StandInMsg",
]

SettlementKind: TypeAlias = Literal["ack", "ack_sync", "nak", "term", "in_progress"]

_JS_ACK_PREFIX = "$JS.ACK."

SPAN_KEY = "natsmw.span"
"""``msg.state`` key of the message's process span, set by tracing. A settlement may come
from code outside the span's context (a pull worker settling what ``fetch`` returned), so
middlewares that need the span look here rather than at the current context."""
# On a handler wrapped by a delay cap, and (functools.wraps copies it) on every wrapper
# made around it later: the delay cap itself.
CAPPED_BY = "__natsmw_delay_cap__"
# On the end of a chain behind which the handler runs later, elsewhere (install's pull
# fetch: the chain ends when fetch returns the message): tracing there cannot cover the
# run, and waits to see whether the delivery was a hold.
RUNS_ELSEWHERE = "__natsmw_runs_elsewhere__"


def capped_by(handler: object) -> Any:
    """The delay cap that wraps ``handler`` (through other middlewares too), or ``None``;
    also seen through nats-py's auto-ack wrapper of a JetStream push callback."""
    found = getattr(handler, CAPPED_BY, None)
    if found is None and getattr(handler, "__qualname__", "").startswith(_AUTO_ACK):
        for cell in getattr(handler, "__closure__", None) or ():
            found = getattr(cell.cell_contents, CAPPED_BY, None)
            if found is not None:
                break
    return found


_AUTO_ACK = "JetStreamContext._auto_ack_callback."
_T = TypeVar("_T")


@dataclass(frozen=True)
class Settlement:
    """One settlement call on a JetStream message.

    Attributes:
        kind: which call: ``ack``, ``ack_sync``, ``nak``, ``term`` or ``in_progress``.
        delay: for ``nak``, the redelivery delay in seconds; ``None`` redelivers at once.
        timeout: for ``ack_sync``, how long to wait for the server's confirmation.
    """

    kind: SettlementKind
    delay: float | None = None
    timeout: float = 1.0

    @property
    def is_final(self) -> bool:
        """Whether the call ends this delivery (every kind but ``in_progress``)."""
        return self.kind != "in_progress"


class Position(NamedTuple):
    """Where a JetStream delivery stands: its stream, consumer, stream sequence, and
    ``delivered``, the delivery count."""

    stream: str
    consumer: str
    stream_sequence: int
    delivered: int


class StandInMsg(Msg):
    """A message delivered on behalf of another one (natsmw's due copies of parked messages).

    It is settled on its own reply subject, and shows the original's subject, body, headers
    and ``metadata``; ``original`` is the original's position, for observers (tracing).
    """

    original: Position


@dataclass(frozen=True)
class Report:
    """Something a middleware did to a message, for whoever observes it (tracing, metrics).

    Attributes:
        name: what happened, for example ``natsmw.delay.hold``.
        attributes: low-cardinality details, as OpenTelemetry attribute values.
        link: a W3C ``traceparent`` the message's span should link to, if any.
    """

    name: str
    attributes: Mapping[str, str | bool | int | float] = field(default_factory=dict)
    link: str | None = None


Observer: TypeAlias = Callable[[Report], None]
"""Called with each [`Report`][Report] made on a message while it observes."""

_ACK = Settlement("ack")
_NAK = Settlement("nak")
_TERM = Settlement("term")
_IN_PROGRESS = Settlement("in_progress")


def nak_settlement(delay: float) -> Settlement:
    """``Settlement("nak", delay=delay)``, built at a third of the cost: a hold makes one
    per redelivery, and a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``."""
    made: Settlement = _new_object(Settlement)
    made.__dict__.update(kind="nak", delay=delay, timeout=1.0)
    return made


_new_object = object.__new__

Settle: TypeAlias = Callable[[Settlement], Awaitable[Any]]
"""Sends a settlement onward: to the next interceptor, and in the end to the server."""

Interceptor: TypeAlias = Callable[[Settlement, Settle], Awaitable[Any]]
"""``async def interceptor(settlement, send)``: may pass it on (changed or not) or swallow it."""

_Interception: TypeAlias = tuple[Interceptor, "frozenset[SettlementKind] | None"]
_KINDS = frozenset(get_args(SettlementKind))


class _Registration(Generic[_T]):
    """A ``with`` block that keeps ``item`` in ``items`` while it runs (a class, not a
    generator: it is on the hot path)."""

    __slots__ = ("_item", "_items")

    def __init__(self, items: list[_T], item: _T) -> None:
        self._items = items
        self._item = item

    def __enter__(self) -> None:
        self._items.append(self._item)

    def __exit__(self, *exc_info: object) -> None:
        remove_last(self._items, self._item)


_core_naks_said: set[str] = set()


def _core_nak_said(subject: str) -> None:
    """Warn once per subject: nak() on a core request replies ``-NAK`` to the requester."""
    if subject in _core_naks_said or len(_core_naks_said) >= 1024:
        return
    _core_naks_said.add(subject)
    log.warning(
        "nak() on a core NATS request (subject %s) sends '-NAK ...' to the requester as its "
        "reply: there is no redelivery outside JetStream. Reply or publish instead",
        subject,
    )


def remove_last(items: list[Any], item: object) -> None:
    """Take ``item`` out of ``items`` by identity, from the end: the same interceptor
    registered twice (an outer and an inner block) must leave the outer one where it was."""
    if items and items[-1] is item:
        items.pop()
        return
    for index in range(len(items) - 1, -1, -1):
        if items[index] is item:
            del items[index]
            return


class MessageProxy(Msg):
    """A `Msg` as every natsmw middleware sees it.

    Get it with [`MessageProxy.of`][MessageProxy.of], never by calling the class: one message has
    one proxy.

    Core NATS messages (no JetStream reply subject) are never intercepted: their settlement
    calls reach nats-py directly (it raises ``NotJSMessageError`` without a reply subject; on
    a core request, ``nak`` replies ``-NAK`` to the requester, and natsmw warns once).
    """

    # The proxy shares the real message's instance dictionary: its fields (``subject``,
    # ``data``, ``headers``, ``_ackd`` ...) are read and written at a plain attribute's cost,
    # and a write through either one is seen by both. A wrapt proxy forwarded each read at 6
    # to 9 times that cost, and a middleware reads a dozen per message. natsmw's own
    # per-message fields are slots, so that they never land on the real message.
    __slots__ = (
        "__wrapped__",
        "_self_interceptors",
        "_self_observers",
        "_self_on_run",
        "_self_position",
        "_self_settled",
        "_self_settlement",
        "_self_state",
    )
    __wrapped__: Msg
    _self_interceptors: list[_Interception] | None
    _self_observers: list[Observer] | None
    _self_state: dict[object, Any] | None
    _self_settlement: Settlement | None
    _self_settled: asyncio.Event | None
    _self_position: tuple[str, Position] | None  # and the reply it was read from
    # Called by a middleware that may keep the handler from running (the delay cap), right
    # before it lets it run: tracing opens its span then, so that holds make none. What it
    # returns, if anything, is called in the same frame once the handler is done (the span's
    # context is attached and detached in one task).
    _self_on_run: Callable[[], Callable[[], None] | None] | None

    def __init__(self, msg: Msg) -> None:
        self.__dict__ = msg.__dict__
        self.__wrapped__ = msg
        self._self_interceptors = self._self_observers = self._self_state = None
        self._self_settlement = self._self_settled = self._self_position = None
        self._self_on_run = None

    def __eq__(self, other: object) -> bool:
        # As the message it proxies compares (a dataclass: by its fields).
        if isinstance(other, MessageProxy):
            other = other.__wrapped__
        return self.__wrapped__ == other

    __hash__ = None  # type: ignore[assignment]  # as nats-py's Msg: mutable, unhashable

    def __repr__(self) -> str:
        # Short, as a proxy's was: the dataclass repr would print the whole body and decode
        # lazy headers.
        wrapped = self.__wrapped__
        return f"<MessageProxy of {type(wrapped).__name__} on {wrapped.subject!r} at {id(self):#x}>"

    def __copy__(self) -> MessageProxy:
        # A copy would share this proxy's interceptors, state and settlement, half of it.
        raise TypeError(
            "a natsmw MessageProxy cannot be copied: copy the message (msg.message) and "
            "hand that on, or hand on the proxy itself"
        )

    def __deepcopy__(self, memo: object) -> MessageProxy:
        return self.__copy__()

    @property
    def position(self) -> Position:
        """Stream, consumer, stream sequence and delivery count, from the ack subject.

        The same as in ``metadata``, without its timestamp, at a fraction of its cost; read
        once per message.

        Raises:
            nats.errors.NotJSMessageError: not a JetStream message.
        """
        reply = self.reply
        read = self._self_position
        if read is None or read[0] is not reply:  # read again if the reply was rewritten
            read = self._self_position = (reply, _position(self.__wrapped__))
        return read[1]

    @property
    def identity(self) -> Position:
        """The position of the message the handler sees: [`position`][position], or for a
        `StandInMsg`, the original's (its stream, consumer, sequence, deliveries)."""
        real = self.__wrapped__
        if isinstance(real, StandInMsg):
            return real.original
        return self.position

    @classmethod
    def of(cls, msg: Msg) -> MessageProxy:
        """Return the proxy of ``msg``: ``msg`` itself if it is one already, else a new one.

        The proxy is an instance of ``msg``'s own class too (a ``DueMsg``'s is a ``DueMsg``),
        with that class's properties and methods, but natsmw's settlement calls.
        """
        if isinstance(msg, MessageProxy):
            return msg
        kind = type(msg)
        if kind is Msg:
            return MessageProxy(msg)
        proxy_class = _PROXY_CLASSES.get(kind)
        if proxy_class is None:
            proxy_class = _proxy_class(kind)
            if len(_PROXY_CLASSES) >= _MOST_PROXY_CLASSES:  # classes made per message (mocks)
                _PROXY_CLASSES.clear()
                PROXY_TYPES.intersection_update((MessageProxy, _ForwardingProxy))
            _PROXY_CLASSES[kind] = proxy_class
            PROXY_TYPES.add(proxy_class)
        return proxy_class(msg)

    @property
    def message(self) -> Msg:
        """The real nats-py message behind the proxy."""
        wrapped: Msg = self.__wrapped__
        return wrapped

    @property
    def state(self) -> dict[object, Any]:
        """Per-message state that middlewares share; key it by something your module owns."""
        state = self._self_state
        if state is None:
            state = self._self_state = {}
        return state

    @property
    def settlement(self) -> Settlement | None:
        """The final settlement sent to the server for this delivery, if any yet."""
        return self._self_settlement

    @property
    def is_jetstream(self) -> bool:
        """Whether the message came from a JetStream consumer (and so can be settled)."""
        reply: str = self.__wrapped__.reply
        return reply.startswith(_JS_ACK_PREFIX) if reply else False

    def intercept(
        self, interceptor: Interceptor, *, kinds: Iterable[SettlementKind] | None = None
    ) -> _Registration[_Interception]:
        """See every settlement call made on this message while the ``with`` block runs.

        Interceptors nest like the middlewares that install them: the one installed last (the
        innermost, closest to the handler) sees a call first, and its ``send`` leads to the
        one installed before it, and in the end to the server. With ``kinds``, only those
        calls are seen (the others pass it by), for example ``kinds=("nak",)``.

        Raises:
            ValueError: ``kinds`` is empty, a string, or names something that is not a
                settlement kind.
        """
        only = None if kinds is None else frozenset(kinds)
        if only is not None and (not only or not only <= _KINDS):
            raise ValueError(
                f"kinds must be some of {sorted(_KINDS)} (None: every kind), got {kinds!r}"
            )
        interceptors = self._self_interceptors
        if interceptors is None:
            interceptors = self._self_interceptors = []
        return _Registration(interceptors, (interceptor, only))

    def observe(self, observer: Observer) -> _Registration[Observer]:
        """Receive every [`report`][report] made on this message while the ``with`` block runs."""
        observers = self._self_observers
        if observers is None:
            observers = self._self_observers = []
        return _Registration(observers, observer)

    def report(self, name: str, attributes: Mapping[str, str | bool | int | float], *,
               link: str | None = None) -> None:  # fmt: skip
        """Tell the observers (tracing, when installed) what a middleware did.

        Costs nothing but a check when nobody observes.
        """
        observers = self._self_observers
        if not observers:
            return
        made = Report(name, attributes, link)
        for observer in observers:
            observer(made)

    async def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait until the delivery is settled (any call but ``in_progress``) through the proxy.

        Returns whether it was, before ``timeout`` seconds (``None``: no limit).
        """
        if self._self_settlement is not None:
            return True
        if self._self_settled is None:
            self._self_settled = asyncio.Event()
        try:
            await asyncio.wait_for(self._self_settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def ack(self) -> None:
        """Acknowledge the message (``+ACK``), through the interceptors."""
        interceptors = self._self_interceptors
        if interceptors:
            for _, kinds in interceptors:
                if kinds is None or "ack" in kinds:
                    await self._settle(_ACK)
                    return
        # Nobody intercepts acks (the usual case, on every message): straight to nats-py.
        msg: Msg = self.__wrapped__
        if msg._ackd:
            raise MsgAlreadyAckdError(msg)
        await msg.ack()
        self._self_settlement = _ACK
        if self._self_settled is not None:
            self._self_settled.set()

    async def ack_sync(self, timeout: float = 1.0) -> Msg:
        """Acknowledge and wait for the server's confirmation, through the interceptors."""
        response: Msg = await self._settle(Settlement("ack_sync", timeout=timeout))
        return response

    async def nak(self, delay: Duration | None = None) -> None:
        """Ask for redelivery, after ``delay`` (seconds or ``timedelta``) if given.

        Nothing is sent to the server when it raises: the message stays unsettled and comes
        back after the consumer's ``ack_wait``.

        Raises:
            TypeError: ``delay`` is neither ``None``, a number of seconds nor a ``timedelta``.
            ValueError: ``delay`` is negative, NaN or infinite.
        """
        seconds = None if delay is None else to_seconds(delay, "nak delay")
        reply = self.__wrapped__.reply
        if reply and not reply.startswith(_JS_ACK_PREFIX):
            _core_nak_said(self.__wrapped__.subject)
        await self._settle(nak_settlement(seconds) if seconds else _NAK)

    async def term(self) -> None:
        """Stop redeliveries of the message (``+TERM``), through the interceptors."""
        await self._settle(_TERM)

    async def in_progress(self) -> None:
        """Reset the consumer's ack timer (``+WPI``), through the interceptors."""
        await self._settle(_IN_PROGRESS)

    async def _settle(self, settlement: Settlement) -> Any:
        interceptors = self._self_interceptors
        if not interceptors:
            return await self._send(settlement)
        msg: Msg = self.__wrapped__
        reply = msg.reply
        if not reply or not reply.startswith(_JS_ACK_PREFIX):
            return await self._send(settlement)  # core: nats-py raises NotJSMessageError
        if settlement.kind != "in_progress" and msg._ackd:
            raise MsgAlreadyAckdError(msg)
        # A snapshot: the call goes through the interceptors there were when it was made, even
        # if one of them leaves (its with block ends) while the call is on its way.
        return await self._through(tuple(interceptors), len(interceptors), settlement)

    async def _through(
        self, interceptors: tuple[_Interception, ...], below: int, settlement: Settlement
    ) -> Any:
        """Pass ``settlement`` to the next interceptor below index ``below`` that wants it; in
        the end, to the server."""
        kind = settlement.kind
        while below:
            below -= 1
            interceptor, kinds = interceptors[below]
            if kinds is None or kind in kinds:
                return await interceptor(settlement, partial(self._through, interceptors, below))
        return await self._send(settlement)

    async def _send(self, settlement: Settlement) -> Any:
        msg: Msg = self.__wrapped__
        kind = settlement.kind
        final = kind != "in_progress"
        if final and msg._ackd:
            # Two middlewares both settled: the first one won; say so the way nats-py does.
            raise MsgAlreadyAckdError(msg)
        result: Any = None
        if kind == "ack":
            await msg.ack()
        elif kind == "nak":
            await msg.nak(delay=settlement.delay)
        elif kind == "ack_sync":
            result = await msg.ack_sync(timeout=settlement.timeout)
        elif kind == "term":
            await msg.term()
        else:
            await msg.in_progress()
        if final:
            self._self_settlement = settlement
            if self._self_settled is not None:
                self._self_settled.set()
        return result


class _ForwardingProxy(MessageProxy):
    """The proxy of a message whose fields cannot be shared: a ``Msg`` subclass with slots of
    its own, another library's proxy, a test double. Reads and writes are passed on to it."""

    __slots__ = ()

    def __init__(self, msg: Msg) -> None:
        object.__setattr__(self, "__wrapped__", msg)
        self._self_interceptors = self._self_observers = self._self_state = None
        self._self_settlement = self._self_settled = self._self_position = None
        self._self_on_run = None

    def __getattribute__(self, name: str) -> Any:
        if name in _OWN or (name.startswith("__") and name.endswith("__")):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "__wrapped__"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.__wrapped__, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.__wrapped__, name)

    def __hash__(self) -> int:  # type: ignore[override]  # as the message hashes
        return hash(self.__wrapped__)


# What a forwarding proxy keeps (its slots) or answers itself (natsmw's own methods and
# properties): everything else is the message's.
_OWN = frozenset(MessageProxy.__slots__) | frozenset(
    name for name in vars(MessageProxy) if not name.startswith("__")
)


def _hash_of_wrapped(proxy: MessageProxy) -> int:
    return hash(proxy.__wrapped__)


def _proxy_class(kind: type) -> type[MessageProxy]:
    """The proxy class for messages of ``kind``: one that is a ``kind`` too and shares the
    message's fields, when ``kind`` is laid out as ``Msg`` is; else a forwarding one."""
    if not (isinstance(kind, type) and issubclass(kind, Msg)) or (
        kind.__basicsize__ != Msg.__basicsize__ or not kind.__dictoffset__
    ):
        return _ForwardingProxy
    namespace: dict[str, Any] = {"__slots__": (), "__module__": __name__}
    if kind.__hash__ is not None:  # a message class of the user's that hashes
        namespace["__hash__"] = _hash_of_wrapped
    return type(kind.__name__, (MessageProxy, kind), namespace)


PROXY_TYPES: set[type] = {MessageProxy, _ForwardingProxy}
"""The classes of proxies: ``type(msg) in PROXY_TYPES`` tells a proxy at a set lookup's cost."""
_PROXY_CLASSES: dict[type, type[MessageProxy]] = {}
_MOST_PROXY_CLASSES = 64

WIRE_BODY = "_natsmw_wire_data"  # on a message whose body was replaced (a claim check's read)


def wire_body(msg: Msg) -> bytes:
    """The body ``msg`` was delivered with, before a middleware replaced it (a claim check
    puts the referenced body in ``data``): what a parked copy keeps, and what is measured
    against the server's ``max_payload``."""
    wire: bytes | None = msg.__dict__.get(WIRE_BODY)
    return msg.data if wire is None else wire


_new_position = partial(tuple.__new__, Position)  # skips NamedTuple's Python-level __new__


def _position(msg: Msg) -> Position:
    reply = msg.reply
    if reply and reply.startswith(_JS_ACK_PREFIX):
        tokens = reply.split(".")
        if len(tokens) == 9:
            position: Position = _new_position(
                (tokens[2], tokens[3], int(tokens[5]), int(tokens[4]))
            )
            return position
    meta = msg.metadata  # with a domain and an account hash; or raises
    return Position(meta.stream, meta.consumer, meta.sequence.stream, meta.num_delivered)
