"""compose() and middleware(): pure tests, no server."""

from __future__ import annotations

import asyncio
import functools
import inspect

import pytest
from nats.aio.msg import Msg

from natsmw import Handler, MessageProxy, Middleware, compose, middleware, with_delay_cap


def recorder(name: str, log: list[str]) -> Middleware:
    async def step(msg: MessageProxy, call_next: Handler) -> None:
        log.append(f"enter {name}")
        await call_next(msg)
        log.append(f"exit {name}")

    return middleware(step)


def make_msg() -> Msg:
    return Msg(_client=None, subject="core.subject", data=b"x")  # type: ignore[arg-type]


async def test_compose_runs_the_first_middleware_outermost() -> None:
    log: list[str] = []

    @compose(recorder("a", log), recorder("b", log), recorder("c", log))
    async def handler(msg: Msg) -> None:
        log.append("handler")

    await handler(make_msg())

    assert log == [
        "enter a", "enter b", "enter c", "handler", "exit c", "exit b", "exit a",
    ]  # fmt: skip


async def test_stacked_decorators_and_compose_build_the_same_chain() -> None:
    composed: list[str] = []
    stacked: list[str] = []

    @compose(recorder("a", composed), recorder("b", composed))
    async def first(msg: Msg) -> None:
        composed.append("handler")

    @recorder("a", stacked)
    @recorder("b", stacked)
    async def second(msg: Msg) -> None:
        stacked.append("handler")

    await first(make_msg())
    await second(make_msg())
    assert composed == stacked


async def test_a_wrapper_between_two_layers_is_never_skipped() -> None:
    """Adjacent natsmw layers are entered without the inner one's coroutine; a user's
    wrapper in between (which functools.wraps gives the inner layer's attributes) runs."""
    log: list[str] = []

    async def handler(msg: Msg) -> None:
        log.append("handler")

    inner = recorder("inner", log)(handler)

    @functools.wraps(inner)
    async def users_wrapper(msg: Msg) -> None:
        log.append("wrapper")
        await inner(msg)

    await recorder("outer", log)(users_wrapper)(make_msg())

    assert log == [
        "enter outer", "wrapper", "enter inner", "handler", "exit inner", "exit outer",
    ]  # fmt: skip


async def test_a_step_may_hand_another_message_to_the_next_layer() -> None:
    """A step that replaces the message (say, decompressed) hands on a plain Msg: the next
    natsmw layer proxies it, as the outer one did the original."""
    seen: list[tuple[type, bytes]] = []

    async def replace(msg: MessageProxy, call_next: Handler) -> None:
        await call_next(Msg(_client=None, subject=msg.subject, data=b"new"))  # type: ignore[arg-type]

    async def look(msg: MessageProxy, call_next: Handler) -> None:
        seen.append((type(msg), msg.data))
        await call_next(msg)

    @compose(middleware(replace), middleware(look))
    async def handler(msg: Msg) -> None:
        seen.append((type(msg), msg.data))

    await handler(make_msg())

    assert seen == [(MessageProxy, b"new"), (MessageProxy, b"new")]


async def test_empty_compose_is_the_identity() -> None:
    async def handler(msg: Msg) -> None:
        pass

    assert compose()(handler) is handler


async def test_every_middleware_shares_one_proxy_per_message() -> None:
    seen: list[MessageProxy] = []

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg)
        await call_next(msg)

    received: list[Msg] = []

    @compose(middleware(step), middleware(step))
    @middleware(step)
    async def handler(msg: Msg) -> None:
        received.append(msg)

    original = make_msg()
    await handler(original)

    assert len(seen) == 3
    assert all(proxy is seen[0] for proxy in seen)
    assert received[0] is seen[0]
    assert isinstance(received[0], Msg)
    assert received[0].message is original


async def test_decorated_handler_keeps_name_docstring_and_signature() -> None:
    async def handle_order(msg: Msg) -> None:
        """Handle one order."""

    decorated = compose(recorder("a", []), recorder("b", []))(handle_order)

    assert decorated.__name__ == "handle_order"
    assert decorated.__doc__ == "Handle one order."
    assert inspect.signature(decorated) == inspect.signature(handle_order)
    assert inspect.iscoroutinefunction(decorated)


async def test_exceptions_from_the_handler_propagate_unchanged() -> None:
    failure = RuntimeError("boom")

    @compose(recorder("a", []), recorder("b", []))
    async def handler(msg: Msg) -> None:
        raise failure

    with pytest.raises(RuntimeError) as caught:
        await handler(make_msg())
    assert caught.value is failure


def test_compose_refuses_a_middleware_factory_that_was_not_called() -> None:
    with pytest.raises(TypeError, match="compose\\(\\) argument 1 must be a middleware"):
        compose(recorder("a", []), 42)  # type: ignore[arg-type]


def test_middleware_refuses_a_sync_handler() -> None:
    def sync_handler(msg: Msg) -> None:
        pass

    with pytest.raises(TypeError, match="wraps async handlers"):
        recorder("a", [])(sync_handler)  # type: ignore[arg-type]


class _Consumer:
    """Handlers of every shape a class may have, each decorated in the class body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, bytes]] = []

    @compose(recorder("outer", []), recorder("inner", []))
    async def method(self, msg: Msg) -> None:
        self.seen.append(("method", self, msg.data))

    @middleware(lambda msg, call_next: call_next(msg))
    async def stepped(self, msg: Msg) -> None:
        self.seen.append(("stepped", self, msg.data))

    @staticmethod
    @compose(recorder("static", []))
    async def static(msg: Msg) -> None:
        _STATIC_SEEN.append(msg.data)

    @compose(recorder("static-inside", []))
    @staticmethod
    async def static_inside(msg: Msg) -> None:
        _STATIC_SEEN.append(msg.data)

    @compose(recorder("class", []))
    @classmethod
    async def of_class(cls, msg: Msg) -> None:
        _STATIC_SEEN.append((cls, msg.data))


_STATIC_SEEN: list[object] = []


async def test_decorated_methods_bind_like_the_functions_they_wrap() -> None:
    """Decorated in a class body, a handler is called as a method, with the instance, as
    nats-py calls ``cb=consumer.method``; static and class methods too."""
    consumer = _Consumer()
    await consumer.method(make_msg())
    await consumer.stepped(make_msg())
    await consumer.static(make_msg())
    await consumer.static_inside(make_msg())
    await consumer.of_class(make_msg())

    assert consumer.seen == [("method", consumer, b"x"), ("stepped", consumer, b"x")]
    assert [b"x", b"x", (_Consumer, b"x")] == _STATIC_SEEN


async def test_partials_and_callable_objects_are_handlers_too() -> None:
    seen: list[object] = []

    async def tagged(tag: str, msg: Msg) -> None:
        seen.append((tag, msg.data))

    class Callable_:
        async def __call__(self, msg: Msg) -> None:
            seen.append(("object", msg.data))

    await compose(recorder("p", []))(functools.partial(tagged, "partial"))(make_msg())
    await compose(recorder("o", []))(Callable_())(make_msg())

    assert seen == [("partial", b"x"), ("object", b"x")]


def test_mistakes_are_refused_when_the_chain_is_built_not_on_a_message() -> None:
    async def handler(msg: Msg) -> None:
        pass

    with pytest.raises(TypeError, match="two arguments"):
        middleware(lambda msg: None)  # type: ignore[arg-type,misc]
    with pytest.raises(TypeError, match="step"):
        middleware("not a step")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="print"):
        compose(recorder("a", []), print)(handler)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"argument 1 is with_delay_cap itself, .*: call it, with_delay_cap"
    ):
        compose(recorder("a", []), with_delay_cap)  # type: ignore[arg-type]


async def test_a_step_that_forgets_await_fails_loudly_and_the_handler_does_not_pass_for_run(
    recwarn: pytest.WarningsRecorder,
) -> None:
    ran: list[str] = []

    async def forgetful(msg: MessageProxy, call_next: Handler) -> None:
        call_next(msg)  # type: ignore[unused-coroutine]  # the mistake

    @middleware(forgetful)
    async def handler(msg: Msg) -> None:
        ran.append("handler")

    with pytest.raises(RuntimeError, match=r"forgetful.*without awaiting it.*await call_next"):
        await handler(make_msg())
    assert ran == []
    assert not [w for w in recwarn if "never awaited" in str(w.message)]  # closed, said once


async def test_a_plain_def_step_that_returns_nothing_is_named_on_the_first_message(
    recwarn: pytest.WarningsRecorder,
) -> None:
    def sync_step(msg: MessageProxy, call_next: Handler) -> None:
        call_next(msg)  # type: ignore[unused-coroutine]  # the mistake

    @middleware(sync_step)  # type: ignore[arg-type]
    async def handler(msg: Msg) -> None: ...

    with pytest.raises(TypeError, match=r"sync_step.*returned None.*async def step"):
        await handler(make_msg())
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


async def test_a_step_that_hands_the_handler_to_a_task_is_left_alone() -> None:
    ran = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def in_background(msg: MessageProxy, call_next: Handler) -> None:
        tasks.append(asyncio.create_task(call_next(msg)))

    @middleware(in_background)
    async def handler(msg: Msg) -> None:
        ran.set()

    await handler(make_msg())
    await asyncio.wait_for(ran.wait(), 5)


async def test_decorated_handlers_return_coroutines_for_create_task() -> None:
    ran: list[str] = []

    class Service:
        @compose(recorder("a", []))
        async def on_msg(self, msg: Msg) -> None:
            ran.append("method")

    @compose(recorder("a", []), recorder("b", []))
    async def handler(msg: Msg) -> None:
        ran.append("function")

    await asyncio.gather(
        asyncio.create_task(handler(make_msg())),
        asyncio.create_task(Service().on_msg(make_msg())),
    )
    assert sorted(ran) == ["function", "method"]


def users_own(call_next: Handler) -> Handler:
    """A middleware written by hand, the documented ``Middleware`` shape."""

    async def handle(msg: Msg) -> None:
        await call_next(msg)

    return handle


class _Service:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str, bytes]] = []

    @compose(users_own)
    async def on_msg(self, msg: Msg) -> None:
        self.seen.append((self.name, msg.data))

    @compose(recorder("outer", []), users_own)
    async def mixed(self, msg: Msg) -> None:
        self.seen.append((f"mixed {self.name}", msg.data))

    @with_delay_cap(1)
    @classmethod
    async def over_classmethod(cls, msg: Msg) -> None:
        _STATIC_SEEN.append(("over", cls, msg.data))


async def test_a_users_middleware_in_compose_binds_methods_to_their_own_instance() -> None:
    first, second = _Service("first"), _Service("second")
    await first.on_msg(make_msg())
    await second.on_msg(make_msg())
    await second.mixed(make_msg())
    await _Service.over_classmethod(make_msg())  # through the class, not an instance

    assert first.seen == [("first", b"x")]
    assert second.seen == [("second", b"x"), ("mixed second", b"x")]
    assert ("over", _Service, b"x") in _STATIC_SEEN
