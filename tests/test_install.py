"""The zero-code install: a chain in front of every subscription callback of one client."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import inspect
import logging
import re
import textwrap
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import wrapt
from nats.aio import client as nats_client
from nats.aio.client import Client
from nats.aio.msg import Msg

import natsmw
import natsmw.installation
from natsmw import (
    Handler,
    MessageProxy,
    Middleware,
    compose,
    middleware,
    with_delay_cap,
    with_size_limit,
)
from natsmw.delay import park
from natsmw.headers import Undecoded, finish_now
from natsmw.installation import install, installed, uninstall
from tests.conftest import Connection, Inbox, Stream, flushed, spy_acks
from tests.delay_support import CAP, LegacyHandler, fetch_and_handle


def tagging(seen: list[str]) -> Middleware:
    async def step(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg.subject)
        await call_next(msg)

    return middleware(step)


async def test_chain_wraps_core_and_jetstream_callbacks_but_not_requests(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    core, pushed = Inbox(), Inbox()
    spy = await spy_acks(conn.nc, stream.name)
    install(conn.nc, chain=tagging(seen))

    async def legacy_core(msg: Msg) -> None:
        await core.put(msg)
        if msg.reply:
            await msg.respond(b"pong")

    async def legacy_push(msg: Msg) -> None:  # auto-acked by nats-py
        await pushed.put(msg)

    await conn.nc.subscribe("legacy.core", cb=legacy_core)
    await conn.js.subscribe(stream.subject, durable="legacy", cb=legacy_push)
    reply = await conn.nc.request("legacy.core", b"ping", timeout=5)  # nats-py's own inbox
    ack = await conn.js.publish(stream.subject, b"job")
    (job,) = await pushed.wait_for(1)
    await spy.catch_up(conn.nc)

    assert reply.data == b"pong"
    # The reply inbox never went through it; the ack spy, made before install, is covered.
    assert seen[:2] == ["legacy.core", stream.subject]
    assert seen[2].startswith(f"$JS.ACK.{stream.name}.")
    assert isinstance(job, MessageProxy)
    assert spy.settlements(ack.seq) == [b"+ACK"]
    uninstall(conn.nc)


async def test_uninstall_leaves_new_subscriptions_unchained(conn: Connection) -> None:
    seen: list[str] = []
    received = Inbox()
    with installed(conn.nc, chain=tagging(seen)):
        await conn.nc.subscribe("during", cb=received.put)
    await conn.nc.subscribe("after", cb=received.put)
    await conn.nc.publish("during", b"1")
    await conn.nc.publish("after", b"2")
    during, after = await received.wait_for(2)

    assert seen == ["during"]  # the subscription made while installed keeps its chain
    assert isinstance(during, MessageProxy)
    assert not isinstance(after, MessageProxy)
    assert "subscribe" not in vars(conn.nc)
    await asyncio.wait_for(flushed(conn.nc), 5)


async def test_chain_runs_around_fetched_messages_until_the_caller_settles(
    conn: Connection, stream: Stream, nats_server: object
) -> None:
    """A legacy pull worker: fetch, handle, settle. The install holds and guards for it."""
    cap = with_delay_cap(CAP, parking=False)  # holds; test_park covers parking through fetch
    guard = with_size_limit(max_body=100, on_oversize="term")
    install(conn.nc, chain=compose(guard, cap))
    js = conn.nc.jetstream()  # a context made after install
    psub = await js.pull_subscribe(stream.subject, durable="worker")
    legacy = LegacyHandler()
    await js.publish(stream.subject, b"x" * 101)  # rejected by the guard, never returned
    await js.publish(stream.subject, b"job")
    batches = await fetch_and_handle(psub, legacy, calls=2)
    got = [msg for batch in batches for msg in batch]

    first, second = legacy.calls
    assert [m.data for m in got] == [b"job", b"job"]
    assert second.at >= legacy.earliest_allowed
    assert (first.handler_calls, second.handler_calls) == (1, 2)
    assert cap.stats.capped == 1
    assert cap.stats.holds >= 3
    assert guard.stats.termed == 1
    await psub.unsubscribe()
    uninstall(conn.nc)


async def test_publish_async_acks_and_old_contexts_after_uninstall_are_left_alone(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    install(conn.nc, chain=tagging(seen))
    js = conn.nc.jetstream()
    ack = await (await js.publish_async(stream.subject, b"x"))  # PubAck via nats-py's own inbox
    assert ack.seq == 1
    assert seen == []
    uninstall(conn.nc)
    psub = await js.pull_subscribe(stream.subject, durable="after")  # context made while installed
    (msg,) = await psub.fetch(1, timeout=5)
    assert not isinstance(msg, MessageProxy)
    await psub.unsubscribe()


async def test_a_failing_chain_keeps_the_rest_of_the_batch(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail_on_bad(msg: MessageProxy, call_next: Handler) -> None:
        if msg.data == b"bad":
            raise RuntimeError("middleware bug")
        await call_next(msg)

    install(conn.nc, chain=middleware(fail_on_bad))
    js = conn.nc.jetstream()
    psub = await js.pull_subscribe(stream.subject, durable="mixed")
    await js.publish(stream.subject, b"good")
    await js.publish(stream.subject, b"bad")
    with caplog.at_level(logging.ERROR, logger="natsmw.install"):
        batch = await psub.fetch(2, timeout=5)
    assert [m.data for m in batch] == [b"good"]
    await batch[0].ack()
    assert "middleware bug" in caplog.text
    await psub.unsubscribe()
    uninstall(conn.nc)


async def test_a_context_uses_the_chain_installed_when_it_subscribes(
    conn: Connection, stream: Stream
) -> None:
    seen: list[str] = []
    install(conn.nc, chain=tagging(seen))
    js = conn.nc.jetstream()
    uninstall(conn.nc)
    install(conn.nc)  # lazy headers only, no chain
    psub = await js.pull_subscribe(stream.subject, durable="reinstalled")
    await js.publish(stream.subject, b"x")
    (msg,) = await psub.fetch(1, timeout=5)
    assert not isinstance(msg, MessageProxy)
    assert seen == []
    await psub.unsubscribe()
    uninstall(conn.nc)


async def test_fetched_messages_with_nothing_to_settle_are_not_kept(
    conn: Connection, stream: Stream
) -> None:
    """ack_policy=none: the caller never settles, and natsmw keeps nothing once fetch returns
    (it used to keep a task, the proxy and the body of each for 300 s)."""
    from nats.js.api import AckPolicy, ConsumerConfig

    await conn.js.add_consumer(
        stream.name, ConsumerConfig(durable_name="none", ack_policy=AckPolicy.NONE)
    )
    for _ in range(200):
        await conn.js.publish(stream.subject, b"x")
    install(conn.nc, chain=with_delay_cap(CAP))
    try:
        psub = await conn.nc.jetstream().pull_subscribe_bind("none", stream.name)
        fetched = await psub.fetch(200, timeout=5)
        running = set(natsmw.installation._running)
        if running:  # the chains around them end at once (they used to wait 300 s)
            await asyncio.wait(running, timeout=5)
        assert len(fetched) == 200
        assert len(natsmw.installation._running) == 0
        await psub.unsubscribe()
    finally:
        uninstall(conn.nc)


async def test_the_wait_for_a_fetched_message_to_be_settled_is_an_install_argument(
    conn: Connection, stream: Stream
) -> None:
    for _ in range(20):
        await conn.js.publish(stream.subject, b"x")
    install(conn.nc, chain=with_delay_cap(CAP), fetch_settle_timeout=0.2)
    try:
        psub = await conn.nc.jetstream().pull_subscribe(stream.subject, durable="kept")
        fetched = await psub.fetch(20, timeout=5)
        assert len(natsmw.installation._running) == 20  # waiting for the caller to settle
        await asyncio.wait(set(natsmw.installation._running), timeout=5)
        assert len(natsmw.installation._running) == 0  # given up after 0.2 s, not 300 s
        for msg in fetched:
            await msg.ack()
        await psub.unsubscribe()
    finally:
        uninstall(conn.nc)
    with pytest.raises(ValueError, match="fetch_settle_timeout"):
        install(conn.nc, fetch_settle_timeout=-1)
    assert conn.nc not in natsmw.installation._installed  # refused before anything changed


def test_the_install_module_is_reachable_beside_the_install_function() -> None:
    assert callable(natsmw.install)
    assert natsmw.installation.FETCH_SETTLE_TIMEOUT == 300.0


async def test_limits_kept_through_a_failed_read_survive_pruning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer whose info cannot be read keeps its last known limits, however many other
    consumers the client has (those not read for a while are pruned)."""
    from types import SimpleNamespace

    import nats.errors

    import natsmw.delay.limits as limits_module
    from natsmw.delay.limits import ConsumerLimits

    clock = [1000.0]  # monotonic seconds, moved by the test
    monkeypatch.setattr(limits_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(limits_module, "_TTL", 0.5)
    monkeypatch.setattr(limits_module, "_RETRY", 0.01)
    monkeypatch.setattr(limits_module, "_PRUNE_ABOVE", 3)
    failing: set[str] = set()

    class JetStream:
        async def consumer_info(self, stream: str, consumer: str, timeout: float) -> object:
            if consumer in failing:
                raise nats.errors.TimeoutError
            config = SimpleNamespace(max_deliver=5, durable_name=consumer, ack_policy=None)
            return SimpleNamespace(config=config, created=None)

    class Client:
        def jetstream(self, **_: object) -> JetStream:
            return JetStream()

    client, limits = Client(), ConsumerLimits()
    assert (await limits.read(client, "S", "x")).max_deliver == 5  # type: ignore[arg-type]
    failing.add("x")
    clock[0] += 0.01  # asked again: the read fails, the value is kept
    assert (await limits.read(client, "S", "x", max_age=0.0)).max_deliver == 5  # type: ignore[arg-type]
    clock[0] += 0.05  # x's retry time is past; it was tried a moment ago
    for n in range(5):
        await limits.read(client, "S", f"other{n}")  # type: ignore[arg-type]
    clock[0] += 0.05
    assert (await limits.read(client, "S", "x", max_age=0.0)).max_deliver == 5  # type: ignore[arg-type]


@pytest.mark.parametrize("other", ["wrapt", "plain"])
async def test_uninstall_takes_out_only_its_own_wrappers(conn: Connection, other: str) -> None:
    """Another library patches subscribe after install (with wrapt, or a plain function):
    uninstall must leave its patch in place, and natsmw's chain must be gone all the same."""
    seen: list[str] = []
    patched: list[str] = []
    received = Inbox()
    install(conn.nc, chain=tagging(seen))
    below = conn.nc.subscribe
    if other == "wrapt":

        def theirs(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            patched.append(args[0])
            return wrapped(*args, **kwargs)

        conn.nc.subscribe = wrapt.FunctionWrapper(below, theirs)  # type: ignore[method-assign]
    else:

        async def plain(subject: str, **kwargs: Any) -> Any:
            patched.append(subject)
            return await below(subject, **kwargs)

        conn.nc.subscribe = plain  # type: ignore[method-assign]
    uninstall(conn.nc)
    await conn.nc.subscribe("after", cb=received.put)
    await conn.nc.publish("after", b"x")
    (msg,) = await received.wait_for(1)

    assert patched == ["after"]  # the other library's patch is still in place
    assert seen == []  # natsmw's chain is not
    assert not isinstance(msg, MessageProxy)
    del conn.nc.subscribe


def refactored_process_msg(old: str, new: str) -> Any:
    """nats-py's own ``Client._process_msg`` with one call rewritten, as a nats-py refactor
    would rewrite it: everything else in the read loop stays exactly nats-py's."""
    source = textwrap.dedent(inspect.getsource(Client._process_msg))
    assert source.count(old) == 1, f"nats-py's _process_msg no longer has {old!r}"
    defined: dict[str, Any] = {}
    exec(
        compile(source.replace(old, new), nats_client.__file__, "exec"), vars(nats_client), defined
    )
    return defined["_process_msg"]


_parse_headers = Client._process_headers


def synchronous_process_headers(self: Client, headers: bytes) -> dict[str, str] | None:
    return finish_now(_parse_headers(self, headers))  # the same parse, no longer a coroutine


async def renamed_process_headers(self: Client, raw: bytes) -> dict[str, str] | None:
    return await _parse_headers(self, raw)


REFACTORS = {
    # _process_headers made synchronous, and called without await.
    "synchronous": (
        synchronous_process_headers,
        "await self._process_headers(headers)",
        "self._process_headers(headers)",
        "not a coroutine function",
    ),
    # _process_headers' parameter renamed, and passed by keyword.
    "renamed": (
        renamed_process_headers,
        "await self._process_headers(headers)",
        "await self._process_headers(raw=headers)",
        "takes (raw), not (headers)",
    ),
}


@pytest.mark.parametrize("refactor", sorted(REFACTORS))
async def test_install_decodes_eagerly_with_one_warning_on_a_refactored_nats_py(
    conn: Connection,
    stream: Stream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    refactor: str,
) -> None:
    """A nats-py whose header parser changed shape: install must not defer decoding (that
    lost every JetStream message with headers, and gave core ones garbage headers), and must
    say so once; messages keep their headers, and the chain is installed all the same."""
    parser, old, new, failure = REFACTORS[refactor]
    monkeypatch.setattr(Client, "_process_headers", parser)
    monkeypatch.setattr(Client, "_process_msg", refactored_process_msg(old, new))
    seen: list[str] = []
    core, pushed = Inbox(), Inbox()
    with caplog.at_level(logging.WARNING, logger="natsmw.install"):
        install(conn.nc, chain=tagging(seen))
    await conn.nc.subscribe("refactored", cb=core.put)
    await conn.js.subscribe(stream.subject, durable="refactored", cb=pushed.put, manual_ack=True)
    await conn.nc.publish("refactored", b"x", headers={"A": "1", "B": "2"})
    await conn.js.publish(stream.subject, b"y", headers={"A": "3"})
    (core_msg,) = await core.wait_for(1)
    (pushed_msg,) = await pushed.wait_for(1)

    assert (core_msg.headers, pushed_msg.headers) == ({"A": "1", "B": "2"}, {"A": "3"})
    assert type(core_msg.message) is Msg  # nats-py's own class: decoding left to nats-py
    assert seen == ["refactored", stream.subject]
    (warning,) = [r for r in caplog.records if r.name == "natsmw.install"]
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert f"nats-py {importlib.metadata.version('nats-py')}" in text
    assert "_process_headers" in text
    assert failure in text
    assert "_process_headers" not in vars(conn.nc)
    assert "msg_class" not in vars(conn.nc)
    await pushed_msg.ack()
    uninstall(conn.nc)
    assert "subscribe" not in vars(conn.nc)


def test_install_takes_the_hook_out_again_when_a_test_block_fails_through_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # pure
    """The parser has the expected shape, but nats-py builds messages another way (here:
    without ``msg_class``), so a deferred block would reach handlers undecoded."""

    def build_without_msg_class(self: Client, sid: int, subject: bytes, reply: bytes,
                                data: bytes, headers: Any) -> Msg:  # fmt: skip
        return Msg(_client=self, subject=subject.decode(), reply=reply.decode(), data=data,
                   headers=headers, _sid=sid)  # fmt: skip

    monkeypatch.setattr(Client, "_build_message", build_without_msg_class)
    nc = Client()
    with caplog.at_level(logging.WARNING, logger="natsmw.install"):
        install(nc)

    (warning,) = caplog.records
    assert "read as Undecoded({'A': '1', 'B': 'é'})" in warning.getMessage()
    assert vars(nc).keys().isdisjoint({"_process_headers", "msg_class"})
    hdr = finish_now(nc._process_headers(b"NATS/1.0\r\nA: 1\r\n\r\n"))
    assert type(hdr) is dict  # nats-py's own, eager decoding
    uninstall(nc)


def test_the_supported_nats_py_range_is_the_declared_dependency() -> None:  # pure
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    (declared,) = re.findall(r'"nats-py([^"]*)"', pyproject)
    assert declared == natsmw.installation.SUPPORTED_NATS_PY


def test_install_on_a_supported_nats_py_defers_decoding_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:  # pure
    nc = Client()
    with caplog.at_level(logging.WARNING, logger="natsmw.install"):
        install(nc)
    assert caplog.records == []
    assert type(finish_now(nc._process_headers(b"NATS/1.0\r\nA: 1\r\n\r\n"))) is Undecoded
    uninstall(nc)


async def test_a_chained_fetch_times_out_with_nats_py_s_own_error() -> None:
    """Where everything fetched was held, the chain fetches again with what is left of the
    caller's timeout; nats-py answers a fetch with almost no time left with a bare
    asyncio.TimeoutError. Callers catch nats.errors.TimeoutError, as nats-py documents."""
    import nats.errors

    class NoDues:
        async def take(self, batch: int) -> list[Msg]:
            return []

    calls: list[float | None] = []

    async def wrapped(batch: int, timeout: float | None) -> list[Msg]:
        calls.append(timeout)
        raise asyncio.TimeoutError  # as nats-py does when its deadline is (all but) gone

    fetch = natsmw.installation._chained_fetch(compose(), NoDues(), 0.0)  # type: ignore[arg-type]
    with pytest.raises(nats.errors.TimeoutError):
        await fetch(wrapped, None, (1, 0.5), {})
    assert calls == [pytest.approx(0.5, abs=0.1)]


async def test_a_jetstream_context_made_while_installed_serves_nothing_after_uninstall(
    conn: Connection, stream: Stream
) -> None:
    install(conn.nc, chain=tagging([]))
    js = conn.nc.jetstream()  # made while installed: its subscribe is wrapped
    uninstall(conn.nc)
    serving_before = set(park._servings)
    received = Inbox()

    await js.subscribe(stream.subject, durable="after-uninstall", cb=received.put)

    assert set(park._servings) == serving_before  # no park serving for a plain subscription


def test_install_on_something_that_is_not_a_client_says_so() -> None:
    with pytest.raises(TypeError, match="nats-py client"):
        install(None)  # type: ignore[arg-type]


async def test_install_refuses_a_chain_that_returns_no_handler(conn: Connection) -> None:
    def forgets_return(handler: Handler) -> Handler:
        async def handle(msg: Msg) -> None:
            await handler(msg)

        return None  # type: ignore[return-value]  # the mistake: every message would be lost

    with pytest.raises(
        TypeError, match=r"install\(chain=...\) got .*forgets_return.*returned None"
    ):
        install(conn.nc, chain=forgets_return)
    with pytest.raises(TypeError, match=r"with_size_limit itself, .*: call it"):
        install(conn.nc, chain=with_size_limit)  # type: ignore[arg-type]
    assert conn.nc not in natsmw.installation._installed  # nothing half-installed


async def test_a_second_delay_cap_is_refused_behind_nats_py_auto_ack_too(
    conn: Connection, stream: Stream
) -> None:
    """nats-py wraps a push callback in its own auto-ack function (manual_ack false): the
    handler's cap inside it is still seen, before and after install."""

    @with_delay_cap(10)
    async def capped(msg: Msg) -> None: ...

    early = await conn.js.subscribe(stream.subject, durable="early-auto", cb=capped)
    with pytest.raises(ValueError, match="two delay caps"):
        install(conn.nc, chain=compose(with_delay_cap(1)))
    await early.unsubscribe()
    install(conn.nc, chain=compose(with_delay_cap(1)))
    try:
        with pytest.raises(ValueError, match="two delay caps"):
            await conn.js.subscribe(stream.subject, durable="late-auto", cb=capped)
    finally:
        uninstall(conn.nc)


class _SyncCallable:
    def __call__(self, msg: Msg) -> None: ...


@pytest.mark.parametrize(
    "callback",
    [lambda msg: None, functools.partial(lambda msg, n: None, n=1), _SyncCallable()],
    ids=["def", "partial", "callable object"],
)
async def test_a_callback_nats_py_refuses_is_refused_by_nats_py_under_install_too(
    conn: Connection, callback: Any
) -> None:
    """Handed to nats-py as it is: nats-py's own error, at subscribe, as without natsmw."""
    with pytest.raises(nats.errors.Error, match="must use coroutine"):
        await conn.nc.subscribe("refused.plain", cb=callback)
    install(conn.nc, chain=compose(with_delay_cap(1)))
    try:
        with pytest.raises(nats.errors.Error, match="must use coroutine"):
            await conn.nc.subscribe("refused.installed", cb=callback)
    finally:
        uninstall(conn.nc)
