"""Size guards on a real server: nothing oversized reaches the handler, nothing is lost."""

from __future__ import annotations

import json
import logging

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from nats.protocol import command as prot_command

import natsmw.guards
from natsmw import Handler
from natsmw.guards import SizeGuard, with_size_limit
from natsmw.headers import Undecoded, original_name
from natsmw.installation import installed
from tests.conftest import AckSpy, Connection, Inbox, Stream, flushed, spy_acks


@pytest.fixture
async def dead_letters(conn: Connection) -> Inbox:
    """A stream that stores the default dead-letter subjects, and what arrives there."""
    await conn.js.add_stream(name="DEAD", subjects=["natsmw.dead_letter.>"])
    arrived = Inbox()
    await conn.js.subscribe("natsmw.dead_letter.>", cb=arrived.put, ordered_consumer=True)
    yield arrived
    await conn.js.delete_stream("DEAD")


def acking(guard: SizeGuard) -> tuple[Inbox, Handler]:
    """A handler under ``guard`` that acks each message it gets, and the inbox it puts them in."""
    handled = Inbox()

    @guard
    async def handler(msg: Msg) -> None:
        await handled.put(msg)
        await msg.ack()

    return handled, handler


async def test_oversized_body_is_copied_to_dead_letter_then_terminated(
    conn: Connection, stream: Stream, dead_letters: Inbox
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=10)
    handled, handler = acking(guard)

    await conn.js.subscribe(stream.subject, durable="g", cb=handler, manual_ack=True)
    big = await conn.js.publish(
        stream.subject, b"x" * 11, headers={"Nats-Msg-Id": "big-1", "K": "v"}
    )
    exact = await conn.js.publish(stream.subject, b"y" * 10)
    empty = await conn.js.publish(stream.subject, b"")
    (copy,) = await dead_letters.wait_for(1)
    passed = await handled.wait_for(2)
    for msg in passed:  # the handler acks after it hands the message over
        assert await msg.wait_settled(5)
    await spy.catch_up(conn.nc)

    assert [m.data for m in passed] == [b"y" * 10, b""]  # at the limit, and empty, pass
    assert copy.subject == f"natsmw.dead_letter.{stream.name}"
    assert copy.data == b"x" * 11
    assert copy.headers is not None
    assert {k: v for k, v in copy.headers.items() if k.startswith("Natsmw-")} == {
        "Natsmw-Rejected-Limit": "body",
        "Natsmw-Rejected-Size": "11",
        "Natsmw-Rejected-Maximum": "10",
        "Natsmw-Original-Subject": stream.subject,
        "Natsmw-Original-Stream": stream.name,
        "Natsmw-Original-Consumer": "g",
        "Natsmw-Original-Sequence": str(big.seq),
        "Natsmw-Original-Msg-Id": "big-1",
    }
    assert copy.headers["K"] == "v"
    assert spy.settlements(big.seq) == [b"+TERM"]
    assert spy.settlements(exact.seq) == [b"+ACK"]
    assert spy.settlements(empty.seq) == [b"+ACK"]
    assert guard.stats.dead_lettered == 1


async def test_copy_that_cannot_be_stored_naks_the_original(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    handled = Inbox()
    guard = with_size_limit(max_body=10, dead_letter_subject="nowhere.{stream}", nak_delay=0.2)

    @guard
    async def handler(msg: Msg) -> None:
        await handled.put(msg)

    await conn.js.subscribe(stream.subject, durable="nowhere", cb=handler, manual_ack=True)
    with caplog.at_level(logging.ERROR, logger="natsmw.guards"):
        big = await conn.js.publish(stream.subject, b"x" * 11)
        await spy.wait_for(2)  # naked, redelivered after 0.2 s, naked again: still not lost

    payloads = spy.settlements(big.seq)
    assert payloads[:2] == [b'-NAK {"delay": 200000000}'] * 2
    assert handled.items == []
    assert guard.stats.dead_letter_failures >= 2
    assert "could not store a dead-letter copy" in caplog.text


@pytest.mark.parametrize(
    ("action", "sent"), [("term", b"+TERM"), ("nak", b'-NAK {"delay": 5000000000}')]
)
async def test_explicit_term_and_nak_actions(
    conn: Connection, stream: Stream, action: str, sent: bytes
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=1, on_oversize=action, nak_delay=5)  # type: ignore[arg-type]

    @guard
    async def handler(msg: Msg) -> None:
        raise AssertionError("an oversized message reached the handler")

    await conn.js.subscribe(stream.subject, durable=action, cb=handler, manual_ack=True)
    big = await conn.js.publish(stream.subject, b"xx")
    await spy.wait_for(1)
    await spy.catch_up(conn.nc)

    assert spy.settlements(big.seq) == [sent]
    assert conn.errors == []


@pytest.mark.parametrize("lazy", [True, False])
async def test_header_limits_measure_without_decoding(
    conn: Connection, stream: Stream, dead_letters: Inbox, lazy: bool
) -> None:
    handled, handler = acking(with_size_limit(max_headers=100, max_header_bytes=40_000))

    with installed(conn.nc, lazy_headers=lazy):
        await conn.js.subscribe(stream.subject, durable=f"h{lazy}", cb=handler, manual_ack=True)
        many = {f"H{i}": "v" for i in range(3_000)}  # JetStream stores at most 64 KiB of headers
        await conn.js.publish(stream.subject, b"", headers=many)
        await conn.js.publish(stream.subject, b"", headers={"Wide": "w" * 50_000})
        await conn.js.publish(stream.subject, b"", headers={f"H{i}": "v" for i in range(100)})
        copies = await dead_letters.wait_for(2)
        (ok,) = await handled.wait_for(1)
        # The guard measured the passing message without decoding its headers.
        assert isinstance(vars(ok).get("_natsmw_headers"), Undecoded) is lazy

    limits = [c.headers["Natsmw-Rejected-Limit"] for c in copies]  # type: ignore[index]
    assert limits == ["header_count", "header_bytes"]
    assert int(copies[0].headers["Natsmw-Rejected-Size"]) == 3000  # type: ignore[index]
    assert len(ok.headers or {}) == 100


async def test_count_and_body_limits_on_lazy_headers_pass_without_decoding(
    conn: Connection, stream: Stream, dead_letters: Inbox
) -> None:
    """Lazy headers under a count limit: counted in the raw block, the passing message left
    undecoded; one header too many, or a claim of a body over the limit, still rejected."""
    handled, handler = acking(with_size_limit(max_body=10, max_headers=3))

    claim = json.dumps({"bucket": "b", "name": "n", "size": 11, "digest": "SHA-256=x"})
    with installed(conn.nc, lazy_headers=True):
        await conn.js.subscribe(stream.subject, durable="lazy", cb=handler, manual_ack=True)
        await conn.js.publish(stream.subject, b"x" * 10, headers={"A": "1", "B": "2", "C": "3"})
        await conn.js.publish(
            stream.subject, b"x", headers={"A": "1", "B": "2", "C": "3", "D": "4"}
        )
        await conn.js.publish(stream.subject, b"", headers={"Natsmw-Claim": claim})
        copies = await dead_letters.wait_for(2)
        (ok,) = await handled.wait_for(1)
        assert isinstance(vars(ok).get("_natsmw_headers"), Undecoded)

    limits = sorted(c.headers["Natsmw-Rejected-Limit"] for c in copies)  # type: ignore[index]
    assert limits == ["body", "header_count"]
    assert ok.data == b"x" * 10


async def test_oversized_core_message_is_dropped_with_a_report(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    handled = Inbox()
    guard = with_size_limit(max_body=3)

    @guard
    async def handler(msg: Msg) -> None:
        await handled.put(msg)

    await conn.nc.subscribe("core.sized", cb=handler)
    with caplog.at_level(logging.WARNING, logger="natsmw.guards"):
        await conn.nc.publish("core.sized", b"toolong")
        await conn.nc.publish("core.sized", b"ok")
        (msg,) = await handled.wait_for(1)

    assert msg.data == b"ok"
    assert guard.stats.dropped == 1
    assert "dropped core message on core.sized: body 7 over the limit of 3" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({}, ValueError, "needs max_body"), ({"max_body": -1}, ValueError, "max_body"),
     ({"max_body": 1.5}, TypeError, "max_body"), ({"max_body": True}, TypeError, "max_body"),
     ({"max_body": 1, "on_oversize": "drop"}, ValueError, "on_oversize"),
     ({"max_body": 1, "dead_letter_subject": "dl.{queue}"}, ValueError, "dead_letter_subject"),
     ({"max_body": 1, "nak_delay": -1}, ValueError, "nak_delay")],
)  # fmt: skip
def test_bad_limits_fail_at_decoration(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        with_size_limit(**kwargs)  # type: ignore[arg-type]


async def test_server_headers_of_the_original_travel_renamed_so_the_copy_is_stored(
    conn: Connection, dead_letters: Inbox
) -> None:
    """A per-message TTL on the original: the dead-letter stream (no TTLs allowed) would
    refuse a copy carrying Nats-TTL, and the original would come back forever."""
    from nats.js.api import StreamConfig

    await conn.js.add_stream(StreamConfig(name="TTLS", subjects=["ttls.>"], allow_msg_ttl=True))
    guard = with_size_limit(max_body=1)

    @guard
    async def handler(msg: Msg) -> None:
        raise AssertionError("an oversized message reached the handler")

    await conn.js.subscribe("ttls.>", durable="ttl", cb=handler, manual_ack=True)
    await conn.js.publish("ttls.x", b"too big", headers={"Nats-TTL": "1h"})
    (copy,) = await dead_letters.wait_for(1)

    assert copy.headers is not None
    assert copy.headers["Natsmw-Original-TTL"] == "1h"
    assert "Nats-TTL" not in copy.headers
    assert guard.stats.dead_lettered == 1
    assert guard.stats.dead_letter_failures == 0
    await conn.js.delete_stream("TTLS")


async def subscribe_refusing(
    conn: Connection, stream: Stream, guard: SizeGuard, *, durable: str, max_deliver: int
) -> None:
    """A push consumer with ``max_deliver`` whose handler must never see a message."""

    @guard
    async def handler(msg: Msg) -> None:
        raise AssertionError("an oversized message reached the handler")

    await conn.js.subscribe(
        stream.subject, durable=durable, cb=handler, manual_ack=True,
        config=ConsumerConfig(ack_wait=30, max_deliver=max_deliver),
    )  # fmt: skip


async def test_no_nak_spends_the_last_delivery_and_the_message_waits_for_the_fix(
    conn: Connection, stream: Stream, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """No stream stores the dead letters, max_deliver=3: the guard must not nak three times
    (the server would drop the message). The nak before the last delivery waits long; once
    the operator adds the stream, the last delivery stores the copy."""
    monkeypatch.setattr(natsmw.guards, "LAST_CHANCE_DELAY", 1.0)  # an hour, compressed
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=1, dead_letter_subject="later.{stream}", nak_delay=0.1)
    await subscribe_refusing(conn, stream, guard, durable="md3", max_deliver=3)
    with caplog.at_level(logging.ERROR, logger="natsmw.guards"):
        big = await conn.js.publish(stream.subject, b"too big")
        await spy.wait_for(2)
        assert spy.settlements(big.seq) == [b'-NAK {"delay": 100000000}',
                                            b'-NAK {"delay": 1000000000}']  # fmt: skip
        assert "one delivery is left" in caplog.text
        await conn.js.add_stream(name="LATER", subjects=["later.>"])
        await spy.wait_for(3)
    await spy.catch_up(conn.nc)

    assert spy.settlements(big.seq)[-1] == b"+TERM"
    copy = await conn.js.get_last_msg("LATER", f"later.{stream.name}")
    assert copy.data == b"too big"
    assert guard.stats.stranded == 0
    await conn.js.delete_stream("LATER")


async def test_a_message_on_its_last_delivery_is_stranded_loudly_never_termed(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=1, dead_letter_subject="nowhere.{stream}")
    await subscribe_refusing(conn, stream, guard, durable="md1", max_deliver=1)
    with caplog.at_level(logging.ERROR, logger="natsmw.guards"):
        big = await conn.js.publish(stream.subject, b"too big")
        await spy.wait_for(1)
    await spy.catch_up(conn.nc)

    assert spy.settlements(big.seq)[0].startswith(b"-NAK")
    assert guard.stats.stranded == 1
    assert f"stays in stream {stream.name} at sequence {big.seq}" in caplog.text
    assert (await conn.js.get_msg(stream.name, big.seq)).data == b"too big"


async def test_every_consumer_and_every_stream_generation_gets_its_own_copy(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await conn.js.add_stream(name="DLQ", subjects=["dlq.>"])
    guard = with_size_limit(max_body=1, dead_letter_subject="dlq.{stream}.{consumer}")

    @guard
    async def handler(msg: Msg) -> None:
        raise AssertionError("an oversized message reached the handler")

    async def one_oversized_message(consumers: tuple[str, ...]) -> AckSpy:
        await conn.js.add_stream(name="GEN", subjects=["gen.>"])
        spy = await spy_acks(conn.nc, "GEN")
        for durable in consumers:
            await conn.js.subscribe("gen.x", durable=durable, cb=handler, manual_ack=True)
        await conn.js.publish("gen.x", b"too big")
        await spy.wait_for(len(consumers))
        await spy.catch_up(conn.nc)
        return spy

    first = await one_oversized_message(("a", "b"))
    assert first.settlements(1) == [b"+TERM", b"+TERM"]
    await conn.js.delete_stream("GEN")
    second = await one_oversized_message(("a",))  # the same name, sequence 1 again
    assert second.settlements(1) == [b"+TERM"]

    info = await conn.js.stream_info("DLQ")
    assert info.state.messages == 3  # a's and b's copy, then the new stream's message 1
    assert guard.stats.dead_lettered == 3
    await conn.js.delete_stream("GEN")
    await conn.js.delete_stream("DLQ")


async def test_header_names_nats_py_cannot_send_are_copied_percent_encoded(
    conn: Connection, stream: Stream, dead_letters: Inbox
) -> None:
    guard = with_size_limit(max_body=1)

    @guard
    async def handler(msg: Msg) -> None:
        raise AssertionError("an oversized message reached the handler")

    await conn.js.subscribe(stream.subject, durable="raw", cb=handler, manual_ack=True)
    # Another client's publish, with names nats-py refuses (BadHeaderError) but the server takes.
    block = b"NATS/1.0\r\nX-Path/Sub: a\r\nX(1): b\r\nPlain: c\r\n\r\n"
    await conn.nc._send_command(
        prot_command.hpub_cmd(stream.subject, "", block, b"too big")  # type: ignore[no-untyped-call]
    )
    await flushed(conn.nc)
    (copy,) = await dead_letters.wait_for(1)

    assert copy.headers is not None
    assert {k: copy.headers[k] for k in ("X-Path%2FSub", "X%281%29", "Plain")} == {
        "X-Path%2FSub": "a", "X%281%29": "b", "Plain": "c",
    }  # fmt: skip
    assert {original_name(k) for k in copy.headers} >= {"X-Path/Sub", "X(1)"}
    assert guard.stats.dead_lettered == 1


async def test_a_copy_stored_before_whose_term_was_lost_is_not_stored_again(
    conn: Connection, stream: Stream, dead_letters: Inbox
) -> None:
    """The copy's id is unique per consumer and stream generation: a duplicate answer means
    this very copy is stored (the term after it was lost), so the original is terminated."""
    spy = await spy_acks(conn.nc, stream.name)
    big = await conn.js.publish(stream.subject, b"too big")
    peek = await conn.js.pull_subscribe(stream.subject, durable="peek")
    (seen,) = await peek.fetch(1, timeout=5)  # the stored time exactly as a delivery has it
    stored = round(seen.metadata.timestamp.timestamp() * 1e6)
    copy_id = f"natsmw-dead-letter:{stream.name}:dup:{big.seq}:{stored}"
    await conn.js.publish(
        f"natsmw.dead_letter.{stream.name}", b"too big", headers={"Nats-Msg-Id": copy_id}
    )
    guard = with_size_limit(max_body=1)
    await subscribe_refusing(conn, stream, guard, durable="dup", max_deliver=-1)
    await spy.wait_for(1)
    await spy.catch_up(conn.nc)

    assert spy.settlements(big.seq) == [b"+TERM"]
    assert (await conn.js.stream_info("DEAD")).state.messages == 1  # not stored twice
    assert guard.stats.dead_lettered == 1


def test_a_guards_limits_are_read_only() -> None:
    """The limits are fixed when the guard is built (its fast path keeps them): changing
    one afterwards is refused, not silently ignored."""
    guard = with_size_limit(max_body=1000)
    with pytest.raises(AttributeError):
        guard.max_body = 10  # type: ignore[misc]
    assert guard.max_body == 1000


async def test_naks_of_many_oversized_messages_log_a_few_lines_not_one_per_delivery(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=1, on_oversize="nak", nak_delay=0.1)

    @guard
    async def handler(msg: Msg) -> None: ...

    with caplog.at_level(logging.WARNING, logger="natsmw.guards"):
        await conn.js.subscribe(stream.subject, durable="flood", cb=handler, manual_ack=True)
        for _ in range(20):
            await conn.js.publish(stream.subject, b"too big")
        await spy.wait_for(60)  # about three naks of each of the twenty

    kept = [r for r in caplog.records if "naked" in r.getMessage()]
    assert guard.stats.naked >= 60
    assert 1 <= len(kept) <= 3, [r.getMessage() for r in kept]
