"""Handlers, middlewares and their composition: the onion model with no framework.

A *handler* is what nats-py calls: ``async def handler(msg) -> None``. A *middleware* takes
the next handler and returns a handler. Composition is function application, so the order is
visible where the chain is built::

    @compose(with_tracing(), with_delay_cap(60))
    async def handle(msg): ...

is ``with_tracing()(with_delay_cap(60)(handle))``: tracing sees the message first.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import Any, TypeAlias, TypeVar, cast, overload

from nats.aio.msg import Msg

from natsmw.message import _PROXY_CLASSES, PROXY_TYPES, MessageProxy

__all__ = ["Decorator", "Handler", "Middleware", "Step", "compose", "middleware"]

Handler: TypeAlias = Callable[[Msg], Coroutine[Any, Any, None]]
"""An async message handler, as nats-py calls it: ``async def handler(msg) -> None``."""

Middleware: TypeAlias = Callable[[Handler], Callable[[Msg], Awaitable[None]]]
"""Takes the next handler, returns a handler that wraps it."""

Step: TypeAlias = Callable[[MessageProxy, Handler], Awaitable[None]]
"""The body of a middleware: ``async def step(msg, call_next) -> None``."""

_M = TypeVar("_M", bound=Msg)
_S = TypeVar("_S")


class Decorator:
    """What natsmw's middlewares are: a handler decorator whose result keeps the handler's
    shape for type checkers.

    A handler may take its message as [`MessageProxy`][natsmw.MessageProxy] (what a decorated
    handler receives: its ``nak`` takes a ``timedelta``) or as nats-py's ``Msg``. Decorated,
    it takes nats-py's ``Msg``, as ``subscribe(cb=...)`` wants, and returns a coroutine, as
    ``asyncio.create_task`` wants. A method ``async def on_msg(self, msg)`` stays a method.
    """

    @overload
    def __call__(self, handler: Callable[[_M], Awaitable[None]], /) -> Handler: ...
    @overload
    def __call__(
        self, handler: Callable[[_S, _M], Awaitable[None]], /
    ) -> Callable[[_S, Msg], Coroutine[Any, Any, None]]: ...
    def __call__(self, handler: Any, /) -> Any:
        """Wrap ``handler``.

        Raises:
            TypeError: ``handler`` is a plain ``def``, not an ``async def`` handler.
            ValueError: ``handler`` is already wrapped by a delay cap and this is another
                one (also through other middlewares): two caps would keep two deadlines
                under one record.
        """
        if isinstance(handler, (staticmethod, classmethod)):
            # Decorated over @staticmethod or @classmethod: the function inside is wrapped,
            # and the result is the same kind of method, so that it binds as before.
            kind: Any = type(handler)
            inside: Any = handler.__func__
            return kind(self._wrap(inside))
        return self._wrap(handler)

    def _wrap(self, handler: Handler) -> Handler:
        raise NotImplementedError


class _Composed(Decorator):
    __slots__ = ("_middlewares",)

    def __init__(self, middlewares: tuple[Middleware, ...]) -> None:
        self._middlewares = middlewares

    def _wrap(self, handler: Handler) -> Handler:
        chained = self._apply(handler)
        if all(isinstance(applied, Decorator) for applied in self._middlewares):
            return chained  # natsmw's own layers bind as methods by themselves
        # A middleware of the user's own knows nothing of methods: called as a method
        # (``handle(instance, msg)``), the chain goes around the bound method, made once per
        # instance.
        apply = self._apply
        per_instance: weakref.WeakKeyDictionary[object, Handler] = weakref.WeakKeyDictionary()

        @functools.wraps(chained)
        async def handle(msg: Msg, bound_msg: Msg = _UNBOUND) -> None:
            if bound_msg is _UNBOUND:
                await chained(msg)
                return
            instance: object = msg
            try:
                method = per_instance.get(instance)
                if method is None:
                    method = per_instance[instance] = apply(bound(handler, instance))
            except TypeError:  # not weakly referenceable, or unhashable: made each time
                method = apply(bound(handler, instance))
            await method(bound_msg)

        return handle

    def _apply(self, handler: Handler) -> Handler:
        for applied in reversed(self._middlewares):
            handler = require_handler(applied(handler), applied, "compose()")
        return handler

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self._middlewares))})"


def compose(*middlewares: Middleware) -> Decorator:
    """Return a decorator that applies ``middlewares``, the first one outermost.

    ``compose()`` with no middleware returns the handler unchanged.

    Raises:
        TypeError: one of ``middlewares`` is not callable (for example ``with_delay_cap``
            given without calling it).
        ValueError: two middlewares of a kind a chain may have only one of (delay caps).
    """
    once: dict[str, object] = {}
    for position, candidate in enumerate(middlewares):
        require_middleware(candidate, f"compose() argument {position}")
        kind = getattr(candidate, "one_per_chain", None)
        if isinstance(kind, str):
            if kind in once:
                raise ValueError(
                    f"compose() got two {kind}s, {once[kind]!r} and {candidate!r}: a chain "
                    f"may have one"
                )
            once[kind] = candidate
    return _Composed(middlewares)


def require_middleware(candidate: object, what: str) -> None:
    """Refuse what cannot be a middleware, naming ``what`` it was given as.

    Raises:
        TypeError: ``candidate`` is not callable, or is one of natsmw's middleware factories
            (``with_delay_cap``...) given without calling it.
    """
    if not callable(candidate):
        raise TypeError(
            f"{what} must be a middleware (a callable that takes a handler), got {candidate!r}"
        )
    name = getattr(candidate, "__name__", "")
    if isinstance(candidate, type) and issubclass(candidate, Decorator):
        raise TypeError(
            f"{what} is the class {name}, not a middleware: make one with its function, "
            f"for example with_delay_cap(60), with_size_limit(...) or with_tracing()"
        )
    if (
        inspect.isfunction(candidate)
        and candidate.__module__.startswith("natsmw.")
        and name.startswith("with_")
    ):
        raise TypeError(f"{what} is {name} itself, which makes a middleware: call it, {name}(...)")


def require_handler(wrapped: object, applied: object, what: str) -> Handler:
    """``wrapped``, what a middleware returned for a handler, if it can be one.

    Raises:
        TypeError: ``wrapped`` is not callable (a middleware that forgot ``return``).
    """
    if not callable(wrapped):
        raise TypeError(
            f"{what} got {applied!r}, which returned {wrapped!r} for a handler, not a "
            f"handler: a middleware takes the next handler and returns one (for a "
            f"step(msg, call_next), use middleware(step))"
        )
    # A coroutine function, or a callable returning an awaitable, which nats-py and the
    # layers around it await alike.
    return cast(Handler, wrapped)


def middleware(step: Step) -> Decorator:
    """Turn ``step(msg, call_next)`` into a middleware.

    The step receives the message's single [`MessageProxy`][natsmw.message.MessageProxy] (created on
    first use, shared by every middleware on the chain) and the next handler, which it may
    call, or not. The returned middleware keeps the wrapped handler's name, docstring and
    signature, so the result still reads as the user's handler in logs and tracebacks.

    Raises:
        TypeError: ``step`` is not callable or cannot take ``(msg, call_next)``; when
            applied, the handler is not an ``async def`` handler.
        RuntimeError: on a message, the step called ``call_next(msg)`` without awaiting it
            (the handler never ran; the message stays unsettled and comes back after the
            consumer's ``ack_wait``). ``TypeError`` when the step returned ``None`` (a plain
            ``def``).
    """
    _require_step(step)
    return _Stepped(_awaiting(step))


Fuse: TypeAlias = Callable[
    [Handler, "tuple[Callable[[Msg], bool], ...]", Callable[..., Awaitable[None]]], Handler
]
"""``fuse(call_next, checks, general)``: the chain's handler, made once. It settles or runs
the chain's usual messages itself, in one coroutine (making the proxy and calling
``call_next`` where it runs one), where every one of ``checks`` (the layers outside, which
only pass messages on) passes the message; every other message, and a method's call, goes to
``general(msg, bound_msg)``, the chain as it would be without it."""


def layer(
    step: Step,
    *,
    passes: Callable[[Msg], bool] | None = None,
    fuse: Fuse | None = None,
) -> Decorator:
    """[`middleware`][middleware] for natsmw's own steps, which await what they call.

    ``passes(msg)``: this layer would hand ``msg`` on unchanged, with nothing to see of what
    follows (a size guard's message within its limits). ``fuse``: this layer may run or
    settle its usual messages in one coroutine for the chain (the delay cap's first delivery
    and usual hold), with the layers right outside it that have ``passes`` checked in place. A
    layer with neither (tracing, claims, a user's middleware) sees every message.
    """
    return _Stepped(step, passes, fuse)


class _Stepped(Decorator):
    __slots__ = ("_fuse", "_passes", "_step")

    def __init__(
        self,
        step: Step,
        passes: Callable[[Msg], bool] | None = None,
        fuse: Fuse | None = None,
    ) -> None:
        self._step = step
        self._passes = passes
        self._fuse = fuse

    def __repr__(self) -> str:
        return f"middleware({getattr(self._step, '__wrapped__', self._step)!r})"

    def _wrap(self, handler: Handler) -> Handler:
        _require_async(handler)
        step = self._step
        # A natsmw layer right inside this one is entered at its step, without its own
        # coroutine: the message is a proxy already. Only that very layer: a wrapper of it
        # made with functools.wraps carries its attribute too, and must not be skipped.
        inner = getattr(handler, _ENTRY, None)
        call_next = inner[1] if inner is not None and inner[0] is handler else handler
        fuse, fused_next, checks = self._fuse, call_next, ()
        if fuse is None and self._passes is not None:
            below = getattr(handler, _FUSE, None)
            if below is not None and below[0] is handler:  # that very layer, as for _ENTRY
                fuse, fused_next, checks = below[1], below[2], (self._passes, *below[3])

        async def handle(msg: Msg, bound_msg: Msg = _UNBOUND) -> None:
            then = call_next
            if bound_msg is not _UNBOUND:
                # Decorated in a class body and called as a method: ``msg`` is the instance.
                then = bound(handler, msg)
                msg = bound_msg
            # Inner layers get the proxy itself: type() tells at no call's cost. The outer
            # one makes it (for nats-py's own class, what MessageProxy.of does, without its
            # call).
            kind = type(msg)
            if kind not in PROXY_TYPES:
                if kind is Msg:
                    msg = MessageProxy(msg)
                else:
                    made = _PROXY_CLASSES.get(kind)  # a lazy-headers message's, say
                    msg = MessageProxy.of(msg) if made is None else made(msg)
            await step(msg, then)  # type: ignore[arg-type]  # a proxy, by PROXY_TYPES

        def enter(msg: Msg) -> Awaitable[None]:
            if type(msg) in PROXY_TYPES:
                return step(msg, call_next)  # type: ignore[arg-type]  # a proxy
            return handle(msg)  # a step handed on another message: proxy it as handle does

        # What the chain returns looks like the handler (its name, its attributes: the delay
        # cap's mark). A fused handler hides ``handle``, which stays bare (a pull fetch builds
        # a chain per message).
        chained = handle if fuse is None else fuse(fused_next, checks, handle)
        functools.update_wrapper(chained, handler)
        if fuse is not None:
            setattr(chained, _FUSE, (chained, fuse, fused_next, checks))
        setattr(chained, _ENTRY, (chained, enter))
        return chained


def _awaiting(step: Step) -> Step:
    """``step``, raising when it returns with the handler's coroutine never started and held
    by nobody: ``call_next(msg)`` without ``await`` would otherwise pass for handled."""

    @functools.wraps(step)
    async def checked(msg: MessageProxy, call_next: Handler) -> None:
        made: Coroutine[Any, Any, None] | None = None

        def then(message: Msg) -> Coroutine[Any, Any, None]:
            nonlocal made
            made = coroutine = call_next(message)
            return coroutine

        awaitable = step(msg, then)
        if awaitable is None:  # a plain def: whatever it called cannot have been awaited
            if type(made) is CoroutineType:
                made.close()
            raise TypeError(
                f"the middleware step {step!r} returned None, not an awaitable: write it "
                f"as async def step(msg, call_next) and await call_next(msg) (the message "
                f"is left unsettled; it comes back after the consumer's ack_wait)"
            )
        await awaitable
        if (
            type(made) is CoroutineType
            and inspect.getcoroutinestate(made) == inspect.CORO_CREATED
            and sys.getrefcount(made) <= _HELD_BY_NOBODY  # not a task's, not kept to await
        ):
            made.close()  # no "never awaited" warning on top of this error
            raise RuntimeError(
                f"the middleware step {step!r} called call_next(msg) without awaiting it: "
                f"the handler never ran, and the message is left unsettled (it comes back "
                f"after the consumer's ack_wait). Write 'await call_next(msg)'"
            )

    return checked


# References to a coroutine that only ``checked`` holds, as sys.getrefcount counts them: its
# closure cell and getrefcount's own argument.
_HELD_BY_NOBODY = 2


_ENTRY = "_natsmw_entry"  # on a layer's handler: (that handler, its step's entry)
# On a layer's handler: (that handler, its fuse, the handler it calls, its checks).
_FUSE = "_natsmw_fuse"
# A decorated handler is a function, so a method decorated in a class body is called with
# the instance first: ``handle(instance, msg)``. This default tells the two calls apart.
_UNBOUND: Any = object()


def bound(handler: Handler, instance: object) -> Handler:
    """``handler`` as the method of ``instance`` it was decorated as (a function, a static
    or class method, or another descriptor), or ``handler`` itself if it does not bind."""
    get = getattr(type(handler), "__get__", None)
    if get is None:
        return handler  # a callable object, a functools.partial: called as they are
    method: Handler = get(handler, instance, type(instance))
    return method


def _require_step(step: object) -> None:
    """Refuse, when the middleware is made, a step that could only fail on a message."""
    if not callable(step):
        raise TypeError(f"middleware() takes a step(msg, call_next), got {step!r}")
    try:
        signature = inspect.signature(step)
    except (TypeError, ValueError):
        return  # a builtin or an object inspect cannot read: trusted
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"middleware() takes a step(msg, call_next) called with two arguments, got "
            f"{step!r} with the signature {signature}"
        ) from None


def _require_async(handler: object) -> None:
    # Only a plain ``def`` is refused: callables and wrappers from other libraries may return
    # an awaitable without looking like a coroutine function, and they are welcome.
    if isinstance(handler, (staticmethod, classmethod)):
        handler = handler.__func__  # decorated in a class body, under the decorator
    plain_def = inspect.isfunction(handler) or inspect.ismethod(handler)
    if callable(handler) and not (plain_def and not inspect.iscoroutinefunction(handler)):
        return
    raise TypeError(
        f"a natsmw middleware wraps async handlers (async def handler(msg) -> None), "
        f"got {handler!r}"
    )
