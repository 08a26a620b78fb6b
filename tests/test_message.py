"""The message proxy against a real nats-server: interception, single settlement, passthrough."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import pytest
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, NotJSMessageError

from natsmw import Handler, MessageProxy, Middleware, Settlement, compose, middleware, peek_header
from natsmw.headers import Undecoded
from natsmw.installation import installed
from natsmw.message import Position, Settle, SettlementKind, nak_settlement
from tests.conftest import Connection, Inbox, Stream, spy_acks


def interceptor_middleware(
    name: str, log: list[tuple[str, Settlement]], kinds: tuple[SettlementKind, ...] | None = None
) -> Middleware:
    """A middleware that records every settlement it sees (of ``kinds``) and passes it on."""

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        async def record(settlement: Settlement, send: Settle) -> object:
            log.append((name, settlement))
            return await send(settlement)

        with msg.intercept(record, kinds=kinds):
            await call_next(msg)

    return middleware(step)


async def test_interceptor_sees_nak_and_the_real_message_is_settled_once(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    seen: list[tuple[str, Settlement]] = []
    deliveries = Inbox()

    @interceptor_middleware("outer", seen)
    async def handler(msg: Msg) -> None:
        await deliveries.put(msg)
        if msg.metadata.num_delivered == 1:
            await msg.nak(delay=0.05)
        else:
            await msg.ack()

    await conn.js.subscribe(stream.subject, durable="d", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"payload")
    first, second = await deliveries.wait_for(2)
    await spy.catch_up(conn.nc)

    assert [s for _, s in seen] == [Settlement("nak", delay=0.05), Settlement("ack")]
    assert spy.settlements(ack.seq) == [b'-NAK {"delay": 50000000}', b"+ACK"]
    assert first.is_acked
    assert second.is_acked
    assert first.message._ackd
    assert second.message._ackd
    assert conn.errors == []


async def test_auto_ack_subscription_whose_handler_naks_gets_no_second_ack(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    deliveries = Inbox()

    @interceptor_middleware("only", [])
    async def handler(msg: Msg) -> None:
        await deliveries.put(msg)
        if msg.data == b"nak me" and msg.metadata.num_delivered == 1:
            await msg.nak()

    await conn.js.subscribe(stream.subject, durable="auto", cb=handler)  # manual_ack=False
    first = await conn.js.publish(stream.subject, b"nak me")
    await deliveries.wait_for(2)  # the nak, then the redelivery that nats-py auto-acks
    # One subscription handles its messages in order: once the next one arrives, nats-py has
    # finished with the previous one, auto-ack included.
    await conn.js.publish(stream.subject, b"later")
    await deliveries.wait_for(3)
    await spy.catch_up(conn.nc)

    assert spy.settlements(first.seq) == [b"-NAK", b"+ACK"]
    assert conn.errors == []


async def test_interceptors_nest_innermost_first_and_may_rewrite(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    seen: list[tuple[str, Settlement]] = []

    async def shorten(msg: MessageProxy, call_next: Handler) -> None:
        async def rewrite(settlement: Settlement, send: Settle) -> object:
            seen.append(("inner", settlement))
            return await send(Settlement("nak", delay=0.25))

        with msg.intercept(rewrite):
            await call_next(msg)

    done = asyncio.Event()

    @compose(interceptor_middleware("outer", seen), middleware(shorten))
    async def handler(msg: Msg) -> None:
        await msg.nak(delay=3600)
        done.set()

    await conn.js.subscribe(stream.subject, durable="nest", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    await asyncio.wait_for(done.wait(), 5)
    await spy.catch_up(conn.nc)

    assert seen == [
        ("inner", Settlement("nak", delay=3600.0)),
        ("outer", Settlement("nak", delay=0.25)),
    ]
    assert spy.settlements(ack.seq) == [b"-NAK " + json.dumps({"delay": 250_000_000}).encode()]


async def test_an_interceptor_for_some_kinds_sees_only_those_and_the_rest_pass_it_by(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    seen: list[tuple[str, Settlement]] = []
    deliveries = Inbox()

    @compose(
        interceptor_middleware("outer", seen),
        interceptor_middleware("naks only", seen, kinds=("nak",)),
        interceptor_middleware("inner", seen),
    )
    async def handler(msg: Msg) -> None:
        await deliveries.put(msg)
        if msg.metadata.num_delivered == 1:
            await msg.nak(delay=0.05)
        else:
            await msg.ack()

    await conn.js.subscribe(stream.subject, durable="kinds", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    await deliveries.wait_for(2)
    await spy.catch_up(conn.nc)

    nak, ack_ = Settlement("nak", delay=0.05), Settlement("ack")
    assert seen == [("inner", nak), ("naks only", nak), ("outer", nak), ("inner", ack_),
                    ("outer", ack_)]  # fmt: skip
    assert spy.settlements(ack.seq) == [b'-NAK {"delay": 50000000}', b"+ACK"]


def test_the_quick_nak_settlement_is_the_dataclass_one() -> None:  # pure
    # It writes the fields without __init__: a __post_init__ added later would be skipped.
    assert not hasattr(Settlement, "__post_init__")
    assert [f.name for f in dataclasses.fields(Settlement)] == ["kind", "delay", "timeout"]
    made = nak_settlement(2.5)
    assert made == Settlement("nak", delay=2.5)
    assert hash(made) == hash(Settlement("nak", delay=2.5))
    assert repr(made) == repr(Settlement("nak", delay=2.5))
    assert dataclasses.replace(made, delay=1.0) == Settlement("nak", delay=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.delay = 3.0  # type: ignore[misc]


@pytest.mark.parametrize("kinds", [["nak", "ackk"], "nak", ()])
def test_intercept_refuses_kinds_that_are_not_settlement_kinds(kinds: object) -> None:  # pure
    proxy = MessageProxy.of(Msg(_client=None, subject="s", reply="r"))  # type: ignore[arg-type]

    async def interceptor(settlement: Settlement, send: Settle) -> object:
        return await send(settlement)

    with pytest.raises(ValueError, match=f"got {re.escape(repr(kinds))}"):
        proxy.intercept(interceptor, kinds=kinds)  # type: ignore[arg-type]


def test_position_is_read_from_the_reply_once_and_again_when_it_changes() -> None:  # pure
    reply = "$JS.ACK.S.C.{}.5.{}.1700000000000000000.0"
    proxy = MessageProxy.of(Msg(_client=None, subject="s", reply=reply.format(1, 5)))  # type: ignore[arg-type]
    assert proxy.position == Position("S", "C", 5, 1)
    proxy.message.reply = reply.format(3, 7)  # on the message: the proxy shares its fields
    assert proxy.position == Position("S", "C", 5, 3)
    proxy.reply = reply.format(2, 6)  # through the proxy: the message sees it too
    assert proxy.message.reply == reply.format(2, 6)
    assert proxy.position == Position("S", "C", 5, 2)


async def test_settling_twice_raises_nats_py_error_and_sends_once(
    conn: Connection, stream: Stream
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @interceptor_middleware("only", [])
    async def handler(msg: Msg) -> None:
        await msg.ack()
        try:
            await msg.nak()
        except MsgAlreadyAckdError as error:
            outcome.set_result(error)
        else:
            outcome.set_result(None)

    await conn.js.subscribe(stream.subject, durable="twice", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    assert isinstance(await asyncio.wait_for(outcome, 5), MsgAlreadyAckdError)
    await spy.catch_up(conn.nc)
    assert spy.settlements(ack.seq) == [b"+ACK"]


async def test_pull_fetch_messages_go_through_the_chain(conn: Connection, stream: Stream) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    seen: list[tuple[str, Settlement]] = []

    @interceptor_middleware("only", seen)
    async def handler(msg: Msg) -> None:
        response = await msg.ack_sync()
        assert isinstance(response, Msg)

    psub = await conn.js.pull_subscribe(stream.subject, durable="puller")
    ack = await conn.js.publish(stream.subject, b"x")
    (msg,) = await psub.fetch(1, timeout=5)
    await handler(msg)
    await spy.catch_up(conn.nc)

    assert seen == [("only", Settlement("ack_sync"))]
    assert spy.settlements(ack.seq) == [b"+ACK"]
    assert msg._ackd


async def test_core_messages_pass_through_untouched(conn: Connection) -> None:
    seen: list[tuple[str, Settlement]] = []
    received = Inbox()
    errors: list[BaseException] = []

    @interceptor_middleware("only", seen)
    async def handler(msg: Msg) -> None:
        await received.put(msg)
        if msg.reply:
            await msg.respond(b"pong:" + msg.data)
            return
        try:
            await msg.nak(delay=10)
        except NotJSMessageError as error:  # what nats-py raises on its own
            errors.append(error)

    await conn.nc.subscribe("core.ping", cb=handler)
    await conn.nc.publish("core.ping", b"fire", headers={"K": "v"})
    reply = await conn.nc.request("core.ping", b"ping", timeout=5)
    fired, requested = await received.wait_for(2)

    assert reply.data == b"pong:ping"
    assert (fired.subject, fired.data, fired.headers) == ("core.ping", b"fire", {"K": "v"})
    assert requested.data == b"ping"
    assert len(errors) == 1
    assert isinstance(errors[0], NotJSMessageError)
    assert seen == []


async def test_the_proxy_of_a_lazy_message_decodes_headers_on_first_read_as_nats_py_does(
    conn: Connection,
) -> None:
    """Under install, a handler's proxy passes ``headers`` through to the lazy message: not
    decoded by wrapping or peeking, a plain dict once read, and what nats-py's ``respond``
    sends (it reads ``msg.headers`` itself)."""
    before_read: list[object] = []

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        before_read.append(type(vars(msg.message)["_natsmw_headers"]))
        before_read.append(peek_header(msg, "K"))
        before_read.append(type(vars(msg.message)["_natsmw_headers"]))
        await call_next(msg)

    async def echo(msg: Msg) -> None:
        assert isinstance(msg, MessageProxy)
        assert type(msg.headers) is dict
        msg.headers["Added"] = "1"  # the decoded dict is the message's own, as in nats-py
        await msg.respond(b"pong")

    with installed(conn.nc, chain=middleware(step)):
        await conn.nc.subscribe("lazy.echo", cb=echo)
        reply = await conn.nc.request("lazy.echo", b"ping", headers={"K": "v"}, timeout=5)

    assert before_read == [Undecoded, "v", Undecoded]
    assert reply.data == b"pong"
    assert reply.headers == {"K": "v", "Added": "1"}


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), "10", True])
async def test_bad_nak_delay_raises_before_anything_is_sent(
    conn: Connection, stream: Stream, bad: object
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @interceptor_middleware("only", [])
    async def handler(msg: Msg) -> None:
        try:
            await msg.nak(delay=bad)
        except (TypeError, ValueError) as error:
            outcome.set_result(error)
            await msg.ack()
        else:
            outcome.set_result(None)

    await conn.js.subscribe(stream.subject, durable="bad", cb=handler, manual_ack=True)
    ack = await conn.js.publish(stream.subject, b"x")
    error = await asyncio.wait_for(outcome, 5)
    await spy.catch_up(conn.nc)

    assert isinstance(error, (TypeError, ValueError))
    assert repr(bad) in str(error)
    assert spy.settlements(ack.seq) == [b"+ACK"]  # the nak never left the client


async def test_one_interceptor_registered_twice_leaves_the_outer_one_in_place(
    conn: Connection, stream: Stream
) -> None:
    """Outer and inner blocks register the same interceptor, a middle one another. Once the
    inner block ends, a settlement from the middle reaches the middle's, then the outer's."""
    seen: list[str] = []
    done = asyncio.Event()

    async def same(settlement: Settlement, send: Settle) -> object:
        seen.append("same")
        return await send(settlement)

    async def twice(msg: MessageProxy, call_next: Handler) -> None:
        with msg.intercept(same):
            await call_next(msg)

    async def middle(msg: MessageProxy, call_next: Handler) -> None:
        async def other(settlement: Settlement, send: Settle) -> object:
            seen.append("middle")
            return await send(settlement)

        with msg.intercept(other):
            await call_next(msg)
            await msg.ack()  # after the inner block has ended
        done.set()

    @compose(middleware(twice), middleware(middle), middleware(twice))
    async def handler(msg: Msg) -> None:
        pass

    await conn.js.subscribe(stream.subject, durable="twice", cb=handler, manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    await asyncio.wait_for(done.wait(), 5)

    assert seen == ["middle", "same"]


def test_the_proxy_shares_the_message_fields_and_keeps_its_own_state_to_itself() -> None:  # pure
    from natsmw.delay.park import DueMsg

    msg = Msg(_client=None, subject="s", reply="$JS.ACK.S.C.1.5.5.1700000000000000000.0", data=b"x")  # type: ignore[arg-type]
    proxy = MessageProxy.of(msg)
    assert proxy == msg
    assert MessageProxy.of(proxy) is proxy
    proxy.data = b"rewritten"  # a middleware that rewrites the body: the handler behind sees it
    assert msg.data == b"rewritten"
    msg.headers = {"A": "1"}
    assert proxy.headers == {"A": "1"}
    proxy.state["mine"] = 1
    assert not [name for name in vars(msg) if "self" in name or "state" in name]
    assert MessageProxy.of(msg) is not proxy
    assert MessageProxy.of(msg).state == {}

    due = DueMsg(_client=None, subject="orders", reply="$JS.ACK.P.C.1.9.9.1700000000000000000.0")  # type: ignore[arg-type]
    due_proxy = MessageProxy.of(due)
    assert isinstance(due_proxy, DueMsg)
    assert isinstance(due_proxy, MessageProxy)
    assert due_proxy.subject == "orders"
    assert type(MessageProxy.of(due)) is type(due_proxy)


class SlottedMsg(Msg):
    """A message class of a user's own, with a slot (nc.msg_class = SlottedMsg)."""

    __slots__ = ("seen_at",)


class HashableMsg(Msg):
    def __hash__(self) -> int:
        return hash((self.subject, self.reply))


async def test_messages_whose_fields_cannot_be_shared_get_a_forwarding_proxy() -> None:  # pure
    import copy
    import types

    import wrapt

    reply = "$JS.ACK.S.C.1.5.5.1700000000000000000.0"
    slotted = SlottedMsg(_client=None, subject="s", reply=reply, data=b"x")  # type: ignore[arg-type]
    slotted.seen_at = 7.0
    foreign = wrapt.ObjectProxy(Msg(_client=None, subject="f", reply=reply, data=b"y"))  # type: ignore[arg-type]
    fake = types.SimpleNamespace(subject="n", reply="", data=b"z", headers=None)
    seen: list[tuple[str, bytes, object]] = []

    @middleware
    async def tag(msg: MessageProxy, call_next: Handler) -> None:
        msg.data += b"!"  # written through the proxy: the message behind sees it
        await call_next(msg)

    @tag
    async def handle(msg: MessageProxy) -> None:
        seen.append((msg.subject, msg.data, getattr(msg, "seen_at", None)))

    for message in (slotted, foreign, fake):
        await handle(message)  # type: ignore[arg-type]
    assert seen == [("s", b"x!", 7.0), ("f", b"y!", None), ("n", b"z!", None)]
    assert (slotted.data, foreign.data, fake.data) == (b"x!", b"y!", b"z!")
    proxy = MessageProxy.of(slotted)
    assert isinstance(proxy, Msg)
    assert proxy.position == Position("S", "C", 5, 1)
    proxy.state["mine"] = 1
    assert not hasattr(slotted, "state")

    hashable = MessageProxy.of(HashableMsg(_client=None, subject="h", reply=reply))  # type: ignore[arg-type]
    assert hash(hashable) == hash(("h", reply))
    assert repr(MessageProxy.of(Msg(_client=None, subject="r", data=b"b" * 100_000))).startswith(  # type: ignore[arg-type]
        "<MessageProxy of Msg on 'r' at 0x"
    )
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.copy(proxy)
