"""Lazy header decoding gives exactly what nats-py gives: differential fuzz and dict behaviour."""

from __future__ import annotations

import asyncio
import copy
import json
import pickle
from collections.abc import Mapping, MutableMapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from wrapt import ObjectProxy

from natsmw import MessageProxy
from natsmw.headers import (
    _NOT_YET,
    Undecoded,
    header_block_size,
    lazy_message_class,
    peek_header,
)
from natsmw.installation import install, installed, uninstall
from tests.conftest import Connection, Inbox, Stream, connect, flushed

_CLIENT = Client()
LazyMsg = lazy_message_class(Msg)

# Header names and values as they come off the wire, including what a hostile or broken
# publisher could send: whitespace, colons, non-ASCII and non-UTF-8 bytes, empty parts.
name_bytes = st.one_of(
    st.sampled_from([b"Nats-Msg-Id", b"Natsmw-Deadline", b"traceparent", b"X", b"x", b"Status"]),
    st.binary(max_size=12).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r")),
)
value_bytes = st.binary(max_size=24).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r"))
line = st.one_of(
    st.tuples(name_bytes, st.sampled_from([b":", b": ", b":\t", b" : "]), value_bytes).map(
        b"".join
    ),
    value_bytes,  # a line with no colon at all
)
status = st.sampled_from(
    [b"", b" 100 Idle Heartbeat", b" 100 FlowControl Request", b" 404 No Messages",
     b" 408 Request Timeout", b" 409 Consumer Deleted", b" 503", b" 100"]
)  # fmt: skip
header_block = st.builds(
    lambda status, lines: (
        b"NATS/1.0" + status + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
    ),
    status,
    st.lists(line, max_size=25),
)


def nats_py_parse(raw: bytes) -> dict[str, str] | None:
    parsed: dict[str, str] | None = run_now(_CLIENT._process_headers(raw))
    return parsed


_INSTALLED = Client()
install(_INSTALLED)


def run_now(coroutine: Any) -> Any:
    """Run a coroutine that never suspends (nats-py's parser, natsmw's header hook)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("suspended")


def lazy_parse(raw: bytes) -> Msg:
    """What an installed client's read loop builds: its header hook, then its message class."""
    headers = run_now(_INSTALLED._process_headers(raw))
    msg: Msg = _INSTALLED._build_message(1, b"s", b"", b"", headers)
    return msg


def outcome(parse: object) -> tuple[str, object]:
    """What a parse gives: its value, or the exception it raises (nats-py raises on some
    malformed status lines, and lazy decoding must raise the same)."""
    try:
        return ("value", parse())  # type: ignore[operator]
    except Exception as error:
        return ("raises", type(error))


def _control(client: Client, hdr: Any) -> str | None:
    return client._is_control_message(b"", hdr) if hdr else None  # as _process_msg does


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=header_block, probe=name_bytes)
def test_lazy_headers_equal_nats_py_for_any_header_block(raw: bytes, probe: bytes) -> None:
    expected = outcome(lambda: nats_py_parse(raw))
    assert outcome(lambda: lazy_parse(raw).headers) == expected
    # What nats-py's read loop asks of the headers of an empty-body message (control
    # messages), asked of what the installed hook returned:
    eager_control = outcome(lambda: _control(_CLIENT, nats_py_parse(raw)))
    assert outcome(lambda: _control(_INSTALLED, run_now(_INSTALLED._process_headers(raw)))) == (
        eager_control
    )
    if expected[0] == "raises":
        return
    headers: dict[str, str] | None = expected[1]  # type: ignore[assignment]
    name = probe.decode("latin-1")
    assert peek_header(lazy_parse(raw), name) == (headers.get(name) if headers else None)
    for key, value in (headers or {}).items():
        assert peek_header(lazy_parse(raw), key) == value
    decoded = lazy_parse(raw).headers
    assert type(decoded) is type(headers)
    assert [type(v) for v in (decoded or {}).values()] == [str] * len(headers or {})
    # What the hook hands nats-py's read loop reads as the headers nats-py would have given.
    handed = run_now(_INSTALLED._process_headers(raw))
    if isinstance(handed, Undecoded):
        assert bool(handed) is bool(headers)
        assert (dict(handed), len(handed), handed == (headers or {})) == (
            headers or {}, len(headers or {}), True,
        )  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        b"NATS/1.0\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n",  # duplicates: the last wins, as in nats-py
        b"NATS/1.0\r\n Spaced : v \r\nIn side: v\r\n\r\n",
        b"NATS/1.0\r\n\xff\xfe: v\r\nK: \xff\xfe\r\n\r\n",
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n\r\n",
        b"NATS/1.0 404 No Messages\r\n\r\n",
        b"NATS/1.0\r\n" + b"".join(b"H%d: %d\r\n" % (i, i) for i in range(10_000)) + b"\r\n",
    ],
)
def test_lazy_headers_equal_nats_py_on_hand_picked_blocks(raw: bytes) -> None:
    expected = nats_py_parse(raw)
    msg = lazy_parse(raw)
    keys = list(expected or {})
    for key in [*keys[:3], *keys[-3:], "Absent", "A"]:
        assert peek_header(lazy_parse(raw), key) == (expected or {}).get(key)
    assert msg.headers == expected


def dict_behaviours(h: dict[str, str]) -> list[object]:
    copied = dict(h)
    mutated = copy.copy(h)
    mutated["New"] = "1"
    del mutated["A"]
    return [
        isinstance(h, dict), h.get("A"), h["B"], "A" in h, "Z" in h, list(h), len(h), bool(h),
        list(h.items()), h == {"A": "1", "B": "2"}, copied, json.dumps(h), mutated,
        copy.deepcopy(h), pickle.loads(pickle.dumps(h)), h.setdefault("A", "x"),
    ]  # fmt: skip


async def _must_not_parse(raw: bytes) -> dict[str, str] | None:
    raise AssertionError(f"{raw!r} was parsed")


class CountingParser:
    """nats-py's parser, counting how often it runs."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, raw: bytes) -> dict[str, str] | None:
        self.calls += 1
        return await _CLIENT._process_headers(raw)


def test_peek_header_sees_through_proxies_without_decoding() -> None:  # pure
    msg = lazy_message_class(Msg)(_client=None, subject="s")  # type: ignore[arg-type]
    msg.headers = Undecoded(_must_not_parse, b"NATS/1.0\r\nA: 1\r\nB:  two \r\n\r\n")  # type: ignore[assignment]
    proxied = ObjectProxy(MessageProxy.of(msg))  # another library's proxy around natsmw's

    assert peek_header(proxied, "B") == "two"
    assert header_block_size(proxied) == (len(b"NATS/1.0\r\nA: 1\r\nB:  two \r\n\r\n"), 2)
    assert type(msg._natsmw_headers) is Undecoded  # type: ignore[attr-defined]  # not decoded


async def test_headers_behave_as_a_dict_for_user_code(conn: Connection) -> None:
    install(conn.nc)
    received = Inbox()
    await conn.nc.subscribe("dict.check", cb=received.put)
    await conn.nc.publish("dict.check", b"x", headers={"A": "1", "B": "2"})
    (lazy,) = await received.wait_for(1)
    uninstall(conn.nc)
    await conn.nc.publish("dict.check", b"x", headers={"A": "1", "B": "2"})
    _, eager = await received.wait_for(2)

    assert type(lazy).__name__ == "LazyMsg"
    assert isinstance(lazy, Msg)
    assert type(eager) is Msg
    assert dict_behaviours(lazy.headers) == dict_behaviours(eager.headers)  # type: ignore[arg-type]
    assert lazy == lazy  # dataclass equality reads headers through the property


async def test_install_applies_to_live_subscriptions_and_uninstall_restores(
    conn: Connection,
) -> None:
    received = Inbox()
    await conn.nc.subscribe("live.sub", cb=received.put)
    with installed(conn.nc):
        await conn.nc.publish("live.sub", b"1", headers={"K": "v"})
        (first,) = await received.wait_for(1)
        assert isinstance(first._natsmw_headers, Undecoded)  # not decoded until read
        assert peek_header(first, "K") == "v"
        assert isinstance(first._natsmw_headers, Undecoded)  # peeking decoded nothing
        assert first.headers == {"K": "v"}
    await conn.nc.publish("live.sub", b"2", headers={"K": "v"})
    _, second = await received.wait_for(2)

    assert type(second) is Msg
    assert conn.nc.msg_class is Msg
    assert "_process_headers" not in vars(conn.nc)


async def test_install_twice_is_refused(conn: Connection) -> None:
    from natsmw.errors import NatsmwError

    with installed(conn.nc), pytest.raises(NatsmwError, match="already installed"):
        install(conn.nc)


async def test_other_clients_are_untouched(conn: Connection, nats_server: object) -> None:
    other = await connect(conn.nc.connected_url.geturl())  # type: ignore[union-attr]
    with installed(conn.nc):
        assert other.nc.msg_class is Msg
        assert conn.nc.msg_class is not Msg
    await other.nc.close()


async def test_jetstream_control_messages_keep_working(conn: Connection, stream: Stream) -> None:
    """Heartbeats and flow control on a push consumer; an empty pull fetch (404/408)."""
    install(conn.nc)
    received = Inbox()
    flow_control_replies = Inbox()  # the client answering the server's flow-control requests
    await conn.nc.subscribe("$JS.FC.>", cb=flow_control_replies.put)
    sub = await conn.js.subscribe(
        stream.subject, durable="ctrl", cb=received.put, idle_heartbeat=0.1, flow_control=True,
        manual_ack=True,
    )  # fmt: skip
    body = b"x" * 60_000
    for i in range(40):  # enough bytes to make the server ask for flow control
        await conn.js.publish(stream.subject, body, headers={"N": str(i)})
    msgs = await received.wait_for(40)
    await flow_control_replies.wait_for(1)
    assert [m.headers["N"] for m in msgs] == [str(i) for i in range(40)]  # type: ignore[index]
    for m in msgs:
        await m.ack()
    # An idle consumer gets heartbeats. Watch them arrive on the deliver subject; the
    # subscription itself must see none of them, and nats-py must report no missed heartbeat.
    heartbeats = Inbox()
    watch = await conn.nc.subscribe(sub._sub.subject, cb=heartbeats.put)
    beats = await heartbeats.wait_for(3)
    assert all(b.headers and b.headers.get("Status") == "100" for b in beats)
    assert len(received.items) == 40
    await watch.unsubscribe()

    psub = await conn.js.pull_subscribe(stream.subject, durable="empty-pull")
    await psub.fetch(40, timeout=5)
    with pytest.raises(asyncio.TimeoutError):
        await psub.fetch(1, timeout=0.3)
    assert conn.errors == []
    await sub.unsubscribe()
    await psub.unsubscribe()
    uninstall(conn.nc)


async def test_oversize_and_garbage_header_inputs_through_a_real_server(conn: Connection) -> None:
    install(conn.nc)
    received = Inbox()
    await conn.nc.subscribe("garbage", cb=received.put)
    many = {f"H{i}": str(i) for i in range(10_000)}
    await conn.nc.publish("garbage", b"", headers=many)
    await conn.nc.publish("garbage", b"", headers={"K": "\u00e9\u00ff"})
    (big, accented) = await received.wait_for(2)

    assert peek_header(big, "H9999") == "9999"
    assert big.headers == many
    assert header_block_size(accented)[1] == 1
    assert accented.headers == {"K": "\u00e9\u00ff"}
    uninstall(conn.nc)


async def test_raw_non_utf8_headers_from_the_wire_decode_as_nats_py_does(
    conn: Connection, nats_server: Any
) -> None:
    """Bytes no nats-py publisher can produce, sent as a raw HPUB, seen by an installed and
    a plain client side by side."""
    plain = await connect(nats_server.url)
    lazy_seen, plain_seen = Inbox(), Inbox()
    install(conn.nc)
    await conn.nc.subscribe("raw.headers", cb=lazy_seen.put)
    await plain.nc.subscribe("raw.headers", cb=plain_seen.put)
    await flushed(conn.nc)
    await flushed(plain.nc)
    block = (
        b"NATS/1.0\r\nK: \xff\xfe bytes\r\n\xe9t\xe9: value\r\nIn side: v\r\nDup: 1\r\n"
        b"Dup: 2\r\nNo colon here\r\nEmpty:\r\n\r\n"
    )
    body = b"payload"
    reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
    await reader.readline()  # INFO
    writer.write(b'CONNECT {"verbose":false,"headers":true}\r\n')
    writer.write(b"HPUB raw.headers %d %d\r\n" % (len(block), len(block) + len(body)))
    writer.write(block + body + b"\r\nPING\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"PONG")
    writer.close()

    (lazy,) = await lazy_seen.wait_for(1)
    (eager,) = await plain_seen.wait_for(1)
    assert isinstance(vars(lazy)["_natsmw_headers"], Undecoded)
    for name in ("K", "Dup", "Empty", "In side", "\u00e9t\u00e9", "Missing"):
        assert peek_header(lazy, name) == (eager.headers or {}).get(name)
    assert lazy.headers == eager.headers
    assert lazy.data == eager.data == body
    uninstall(conn.nc)
    await plain.nc.close()


def mapping_behaviours(h: Mapping[str, str], present: str | None) -> list[object]:
    """Everything a reader may ask of a read-only mapping of headers."""

    def missing() -> object:
        try:
            return h["Absent-Name"]
        except KeyError as error:
            return ("KeyError", error.args)

    return [
        isinstance(h, Mapping), bool(h), len(h), list(h), list(h.keys()), list(h.items()),
        list(h.values()), h.get(present or "x"), h.get("Absent-Name"), h.get("Absent-Name", "d"),
        (present or "x") in h, "Absent-Name" in h, 7 in h, missing(),
        h[present] if present else None, dict(h), h == dict(h), h != {"Other": "1"}, h == 7,
        dict(h) == h, {**h},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        b"NATS/1.0\r\nA: 1\r\nB: 2\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n",
        b"NATS/1.0\r\n Spaced : v \r\nIn side: v\r\n\r\n",  # first line not a plain header
        b"NATS/1.0\r\nNo colon here\r\n\r\n",  # nats-py gives None: an empty mapping
        b"NATS/1.0\r\n\xff\xfe: v\r\nK: \xff\xfe\r\n\r\n",
    ],
)
def test_undecoded_is_a_read_only_mapping_of_what_nats_py_parses(raw: bytes) -> None:  # pure
    parsed = nats_py_parse(raw)
    eager = parsed or {}
    parser = CountingParser()
    lazy = Undecoded(parser, raw)
    present = next(iter(eager), None)

    assert mapping_behaviours(lazy, present) == mapping_behaviours(eager, present)
    assert not isinstance(lazy, MutableMapping)
    assert lazy.decode() == parsed
    assert repr(lazy) == f"Undecoded({parsed!r})"
    assert parser.calls == 1  # parsed on first need, once


def test_undecoded_bool_answers_from_a_plain_first_header_line_without_parsing() -> None:  # pure
    """nats-py asks ``if hdr:`` of every JetStream message: that must not parse the block."""
    assert Undecoded(_must_not_parse, b"NATS/1.0\r\nNats-Msg-Id: 1\r\n\r\n")
    assert Undecoded(_must_not_parse, b"NATS/1.0\r\nX\t:1\r\n\r\n")
    assert not Undecoded(CountingParser(), b"NATS/1.0\r\nIn side: v\r\n\r\n")


@pytest.mark.parametrize(
    "write",
    [
        lambda h: h.__setitem__("A", "2"),
        lambda h: h.__delitem__("A"),
        lambda h: h.update({"B": "2"}),
        lambda h: h.pop("A"),
        lambda h: h.popitem(),
        lambda h: h.setdefault("B", "2"),
        lambda h: h.clear(),
    ],
    ids=["setitem", "delitem", "update", "pop", "popitem", "setdefault", "clear"],
)
def test_undecoded_refuses_writes_with_a_type_error_naming_it(write: Any) -> None:  # pure
    lazy = Undecoded(CountingParser(), b"NATS/1.0\r\nA: 1\r\n\r\n")
    with pytest.raises(TypeError, match=r"Undecoded headers are read-only .*msg\.headers"):
        write(lazy)
    assert dict(lazy) == {"A": "1"}


async def test_undecoded_headers_of_real_messages_read_as_nats_py_dicts(
    conn: Connection, nats_server: Any
) -> None:
    """What the installed hook hands nats-py's read loop, next to what nats-py decodes."""
    plain = await connect(nats_server.url)
    lazy_seen, plain_seen = Inbox(), Inbox()
    install(conn.nc)
    await conn.nc.subscribe("mapping.check", cb=lazy_seen.put)
    await plain.nc.subscribe("mapping.check", cb=plain_seen.put)
    await flushed(plain.nc)
    sent = [{"A": "1", "B": "2"}, {"Nats-Msg-Id": "x", "K": "\u00e9", "Z": ""}]
    for headers in sent:
        await conn.nc.publish("mapping.check", b"body", headers=headers)
    lazies = await lazy_seen.wait_for(2)
    eagers = await plain_seen.wait_for(2)

    for lazy, eager in zip(lazies, eagers, strict=True):
        undecoded = vars(lazy)["_natsmw_headers"]
        assert type(undecoded) is Undecoded
        for name in [*(eager.headers or {}), None]:
            assert mapping_behaviours(undecoded, name) == mapping_behaviours(eager.headers, name)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="read-only"):
            undecoded["A"] = "changed"
        assert lazy.headers == eager.headers
        assert type(lazy.headers) is dict
        lazy.headers["A"] = "changed"  # msg.headers stays the dict nats-py gives: writable
    uninstall(conn.nc)
    await plain.nc.close()


async def test_push_consumer_messages_stay_undecoded_through_nats_py_checks(
    conn: Connection, stream: Stream
) -> None:
    """nats-py's read loop asks ``if hdr:`` of every JetStream message, and looks into the
    headers of empty ones for control messages: neither may cost the lazy saving of the
    others, nor a message."""
    install(conn.nc)
    received = Inbox()
    await conn.js.subscribe(stream.subject, durable="undecoded", cb=received.put, manual_ack=True)
    await conn.js.publish(stream.subject, b"body", headers={"A": "1"})
    await conn.js.publish(stream.subject, b"", headers={"A": "2"})  # looked into by nats-py
    with_body, empty = await received.wait_for(2)

    assert vars(with_body)["_natsmw_headers"]._decoded is _NOT_YET  # `if hdr:` parsed nothing
    assert vars(empty)["_natsmw_headers"]._decoded == {"A": "2"}  # parsed once, for nats-py
    assert (with_body.headers, empty.headers) == ({"A": "1"}, {"A": "2"})
    for msg in (with_body, empty):
        await msg.ack()
    uninstall(conn.nc)


async def test_pull_fetch_decodes_every_message_as_the_readme_says(
    conn: Connection, stream: Stream
) -> None:
    """nats-py's fetch reads ``msg.headers`` of each message to find status lines
    (``JetStreamContext.is_status_msg``), so lazy headers save nothing on pull consumers.
    The README says so; this fails, and the README should change, when nats-py stops."""
    install(conn.nc)
    psub = await conn.js.pull_subscribe(stream.subject, durable="fetched")
    await conn.js.publish(stream.subject, b"body", headers={"A": "1"})
    (msg,) = await psub.fetch(1, timeout=5)

    assert type(vars(msg)["_natsmw_headers"]) is dict  # decoded by nats-py, inside fetch
    assert msg.headers == {"A": "1"}
    await msg.ack()
    await psub.unsubscribe()
    uninstall(conn.nc)
