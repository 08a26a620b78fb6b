"""Claim checks on real nats-servers: large bodies travel through the object store, reach
the handler byte for byte, and a missing or wrong object never reaches it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, ObjectStoreConfig
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import natsmw
from natsmw import (
    CLAIM_HEADER,
    Claim,
    ClaimCheck,
    compose,
    handler_calls,
    with_claim_check,
    with_delay_cap,
    with_size_limit,
    with_tracing,
)
from natsmw.delay import PARK_STREAM
from natsmw.server import NatsCluster
from tests.conftest import (
    AckSpy,
    Connection,
    Inbox,
    NotifyingExporter,
    Stream,
    add_stream_when_ready,
    connect,
    flushed,
    spy_acks,
)
from tests.test_park import served

MB = 1 << 20


def unique_bucket() -> str:
    return f"claims_{os.urandom(4).hex()}"


async def stored_headers(
    conn: Connection, stream: Stream, seq: int
) -> tuple[bytes, dict[str, str]]:
    raw = await conn.js.get_msg(stream.name, seq)
    return raw.data or b"", dict(raw.headers or {})


async def naks_of(spy: AckSpy, conn: Connection, count: int) -> list[bytes]:
    """The first ``count`` settlements the server got for the stream (waiting for them)."""
    settled = await spy.wait_for(count, timeout=15)
    await spy.catch_up(conn.nc)
    return [m.data for m in settled]


async def test_a_20_mb_body_reaches_two_consumers_and_plain_nats_py_byte_for_byte(
    conn: Connection, stream: Stream
) -> None:
    body = os.urandom(20 * MB)
    check = ClaimCheck(threshold=MB, bucket=unique_bucket(), ttl=3600)
    ack = await natsmw.publish(conn.js, stream.subject, body, claim_check=check, headers={"K": "v"})

    wire, headers = await stored_headers(conn, stream, ack.seq)
    assert wire == b""  # the stream holds the reference, not the body
    claim = Claim.from_header(headers[CLAIM_HEADER])
    assert (claim.bucket, claim.size, headers["K"]) == (check.bucket, len(body), "v")
    assert claim.name.startswith(f"{stream.subject}/")  # the guide: named after the subject
    assert (await conn.js.stream_info(f"OBJ_{check.bucket}")).config.max_age == 3600  # ttl

    seen: dict[str, Inbox] = {"one": Inbox(), "two": Inbox()}
    for name, inbox in seen.items():

        @compose(with_size_limit(max_body=32 * MB), with_claim_check())
        async def handle(msg: Msg, inbox: Inbox = inbox) -> None:
            await inbox.put(msg)
            await msg.ack()

        await conn.js.subscribe(stream.subject, durable=name, cb=handle, manual_ack=True)
    for inbox in seen.values():
        (got,) = await inbox.wait_for(1, timeout=30)
        assert got.data == body
        assert got.headers is not None
        assert got.headers[CLAIM_HEADER] == headers[CLAIM_HEADER]  # the header stays

    # Without natsmw: what the module docstring and the README say to do.
    reference = json.loads(headers["Natsmw-Claim"])
    plain = (await (await conn.js.object_store(reference["bucket"])).get(reference["name"])).data
    assert plain == body
    await conn.js.delete_object_store(check.bucket)


async def test_small_bodies_travel_as_they_are_and_pass_the_middleware(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=100, bucket=unique_bucket())
    ack = await natsmw.publish(conn.js, stream.subject, b"x" * 100, claim_check=check)
    wire, headers = await stored_headers(conn, stream, ack.seq)
    assert wire == b"x" * 100
    assert CLAIM_HEADER not in headers
    handled = Inbox()

    @with_claim_check()
    async def handle(msg: Msg) -> None:
        await handled.put(msg)
        await msg.ack()

    await conn.js.subscribe(stream.subject, durable="small", cb=handle, manual_ack=True)
    (got,) = await handled.wait_for(1)
    assert got.data == b"x" * 100
    with pytest.raises(nats.js.errors.BucketNotFoundError):  # nothing made for small bodies
        await conn.js.object_store(check.bucket)


@pytest.mark.parametrize("fault", ["deleted", "replaced", "bad header", "over max_size"])
async def test_a_body_that_cannot_be_had_never_reaches_the_handler_and_the_message_stays(
    conn: Connection, stream: Stream, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket(), ttl=3600)
    body = os.urandom(2 * MB)
    headers = {"Nats-Msg-Id": f"claim-{fault}"}
    if fault == "bad header":
        await conn.js.publish(stream.subject, b"", headers={CLAIM_HEADER: "{not json"})
    else:
        ack = await natsmw.publish(
            conn.js, stream.subject, body, claim_check=check, headers=headers
        )
        claim = Claim.from_header((await stored_headers(conn, stream, ack.seq))[1][CLAIM_HEADER])
        store = await conn.js.object_store(check.bucket)
        if fault == "deleted":
            await store.delete(claim.name)
        elif fault == "replaced":
            await store.put(claim.name, os.urandom(2 * MB))  # same name, other bytes
    spy = await spy_acks(conn.nc, stream.name)
    called = Inbox()

    @with_claim_check(nak_delay=0.2, max_size=MB if fault == "over max_size" else 64 * MB)
    async def handle(msg: Msg) -> None:
        await called.put(msg)
        await msg.ack()

    with caplog.at_level(logging.ERROR, logger="natsmw.claim"):
        await conn.js.subscribe(stream.subject, durable="d", cb=handle, manual_ack=True)
        settlements = await naks_of(spy, conn, 2)  # naked, came back, naked again
    assert all(s.startswith(b"-NAK") for s in settlements), settlements
    assert called.items == []
    expected = {
        "deleted": "claim_missing",
        "replaced": "claim_corrupt",
        "bad header": "claim_invalid",
        "over max_size": "claim_size",
    }[fault]
    assert expected in caplog.text
    info = await conn.js.consumer_info(stream.name, "d")
    assert info.ack_floor.stream_seq == 0  # never acked: the message is still there
    await conn.js.delete_consumer(stream.name, "d")
    if fault != "bad header":
        await conn.js.delete_object_store(check.bucket)


async def test_dead_letter_on_error_copies_the_reference_then_terms(
    conn: Connection, stream: Stream
) -> None:
    await conn.js.add_stream(name="CLAIMDEAD", subjects=["natsmw.dead_letter.>"])
    try:
        check = ClaimCheck(threshold=10, bucket=unique_bucket())
        ack = await natsmw.publish(conn.js, stream.subject, b"y" * 100, claim_check=check)
        value = (await stored_headers(conn, stream, ack.seq))[1][CLAIM_HEADER]
        await (await conn.js.object_store(check.bucket)).delete(Claim.from_header(value).name)
        spy = await spy_acks(conn.nc, stream.name)
        resolver = with_claim_check(on_error="dead_letter")

        @resolver
        async def handle(msg: Msg) -> None:
            raise AssertionError("the handler must not run")

        await conn.js.subscribe(stream.subject, durable="dl", cb=handle, manual_ack=True)
        (settled,) = await spy.wait_for(1)
        assert settled.data == b"+TERM"
        copy = await conn.js.get_msg("CLAIMDEAD", 1)
        assert copy.headers is not None
        assert copy.headers[CLAIM_HEADER] == value  # the reference travels with the copy
        assert copy.headers["Natsmw-Rejected-Limit"] == "claim_missing"
        assert (resolver.stats.rejected, resolver.stats.dead_lettered) == (1, 1)
        await conn.js.delete_object_store(check.bucket)
    finally:
        await conn.js.delete_stream("CLAIMDEAD")


async def test_the_size_guard_measures_the_referenced_body_without_reading_it(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    await natsmw.publish(conn.js, stream.subject, b"z" * 5000, claim_check=check)
    spy = await spy_acks(conn.nc, stream.name)
    guard = with_size_limit(max_body=1000, on_oversize="nak", nak_delay=30)
    inline = with_size_limit(max_body=1000, measure_referenced=False)
    handled = Inbox()

    @compose(guard, with_claim_check())
    async def handle(msg: Msg) -> None:
        raise AssertionError("over the limit: must not run")

    @compose(inline, with_claim_check())
    async def handle_inline(msg: Msg) -> None:
        await handled.put(msg)
        await msg.ack()

    await conn.js.subscribe(stream.subject, durable="guarded", cb=handle, manual_ack=True)
    (settled,) = await spy.wait_for(1)
    assert settled.data.startswith(b"-NAK")
    assert guard.stats.rejected == 1
    await conn.js.subscribe(stream.subject, durable="inline", cb=handle_inline, manual_ack=True)
    (got,) = await handled.wait_for(1)
    assert got.data == b"z" * 5000  # measured on the wire (empty), then read
    await conn.js.delete_object_store(check.bucket)


async def test_a_parked_message_keeps_its_reference_and_runs_with_its_body_at_the_deadline(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    body = os.urandom(300_000)
    seen: list[tuple[int, bytes, float]] = []
    done = asyncio.Event()
    asked_at: list[float] = []
    parked_bytes: list[int] = []

    async def legacy(msg: Msg) -> None:
        calls = handler_calls(msg)
        seen.append((calls, msg.data, time.time()))
        if calls == 1:
            asked_at.append(time.time())
            await msg.nak(delay=2.0)  # over the cap: parked
            return
        # The due copy in the park stream carries the reference, not the 300 kB body.
        parked_bytes.append((await conn.js.stream_info(PARK_STREAM)).state.bytes)
        await msg.ack()
        done.set()

    cap = with_delay_cap(0.2)
    handle = compose(cap, with_claim_check())(legacy)
    await conn.js.subscribe(stream.subject, durable="parky", cb=handle, manual_ack=True)
    async with served(conn, handle, stream.name, "parky"):
        await natsmw.publish(conn.js, stream.subject, body, claim_check=check)
        await asyncio.wait_for(done.wait(), 15)
    assert [(calls, data == body) for calls, data, _ in seen] == [(1, True), (2, True)]
    assert seen[1][2] >= asked_at[0] + 2.0  # not before its deadline
    assert (cap.stats.parked, cap.stats.park_fallbacks) == (1, 0)
    assert 0 < parked_bytes[0] < 10_000
    await conn.js.delete_object_store(check.bucket)


async def test_a_message_that_cannot_be_published_takes_its_object_with_it(
    conn: Connection,
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await natsmw.publish(conn.js, "no.stream.here", b"q" * 1000, claim_check=check)
    store = await conn.js.object_store(check.bucket)
    (gone,) = await store.list()  # stored, then deleted: one entry, marked deleted
    assert gone.deleted
    with pytest.raises(nats.js.errors.NotFoundError):  # nats-py: no objects at all
        await store.list(ignore_deletes=True)
    await conn.js.delete_object_store(check.bucket)


async def test_the_fetch_shows_on_the_process_span(conn: Connection, stream: Stream) -> None:
    exporter = NotifyingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    done = asyncio.Event()

    @compose(with_tracing(tracer_provider=provider), with_claim_check())
    async def handle(msg: Msg) -> None:
        await msg.ack()
        done.set()

    await conn.js.subscribe(stream.subject, durable="traced", cb=handle, manual_ack=True)
    await natsmw.publish(conn.js, stream.subject, b"t" * 4000, claim_check=check)
    await asyncio.wait_for(done.wait(), 10)
    spans = await exporter.wait_for(1)
    (span,) = [s for s in spans if s.name.startswith("process")]
    (event,) = [e for e in span.events if e.name == "natsmw.claim.fetched"]
    assert event.attributes is not None
    assert event.attributes["natsmw.claim.size"] == 4000
    assert event.attributes["natsmw.claim.bucket"] == check.bucket
    assert 0 < float(event.attributes["natsmw.claim.duration"]) < 10  # type: ignore[arg-type]
    await conn.js.delete_object_store(check.bucket)


def test_claims_and_claim_checks_refuse_bad_input() -> None:  # pure
    for bad in ["", "[]", '{"bucket": "b"}', '{"bucket":1,"name":"n","size":1,"digest":"d"}',
                '{"bucket":"b","name":"n","size":-1,"digest":"d"}',
                '{"bucket":"b","name":"n","size":true,"digest":"d"}',
                '{"bucket":"%s","name":"n","size":1,"digest":"d"}' % ("x" * 4200),
                '{"bucket":"a.b","name":"n","size":1,"digest":"d"}',
                '{"bucket":"b","name":"","size":1,"digest":"d"}',
                "[" * 5000 + "]" * 5000]:  # fmt: skip
        with pytest.raises(ValueError, match="Natsmw-Claim"):
            Claim.from_header(bad)
    claim = Claim("b", "n/1", 3, "SHA-256=abc")
    assert Claim.from_header(claim.header()) == claim
    with pytest.raises(ValueError, match="threshold"):
        ClaimCheck(threshold=-1)
    with pytest.raises(TypeError, match="threshold"):
        ClaimCheck(threshold=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        ClaimCheck(ttl=0)
    with pytest.raises(ValueError, match="replicas"):
        ClaimCheck(replicas=0)
    with pytest.raises(ValueError, match="on_error"):
        with_claim_check(on_error="term")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket"):
        ClaimCheck(bucket="bad name!")
    with pytest.raises(ValueError, match="replicas"):
        ClaimCheck(replicas=6)
    with pytest.raises(ValueError, match="timeout"):
        ClaimCheck(timeout=0)
    with pytest.raises(TypeError, match="max_size"):
        with_claim_check(max_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        with_claim_check(timeout=0)


def test_outside_a_delay_cap_it_says_that_holds_would_read_the_body_again(
    caplog: pytest.LogCaptureFixture,
) -> None:  # pure
    async def handle(msg: Msg) -> None:
        await msg.ack()

    with caplog.at_level(logging.WARNING, logger="natsmw.claim"):
        compose(with_delay_cap(1), with_claim_check())(handle)
        assert caplog.text == ""
        compose(with_claim_check(), with_delay_cap(1))(handle)
    assert "Put it inside the cap" in caplog.text


async def test_on_a_cluster_a_node_stopped_during_the_fetch_costs_a_retry_not_the_message() -> None:
    async with NatsCluster(3) as cluster:
        conn = await connect(*cluster.urls)
        try:
            await add_stream_when_ready(conn, name="CL", subjects=["cl.>"], num_replicas=3)
            check = ClaimCheck(threshold=MB, bucket="claims_cluster")
            body = os.urandom(20 * MB)
            await natsmw.publish(conn.js, "cl.big", body, claim_check=check)
            info = await conn.js.stream_info("OBJ_claims_cluster")
            assert info.config.num_replicas == 3
            handled = Inbox()
            resolver = with_claim_check(timeout=5, nak_delay=0.3)
            # The object stream's leader (never the reader's own server) goes 50 ms into
            # the first read of the 20 MB body.
            leader = info.cluster.leader if info.cluster else None
            victim = next((n for n, s in enumerate(cluster.servers) if s.name == leader), 1)
            victim = victim or 1
            reads: list[float] = []

            async def stop_during_the_first_read(msg: Msg, call_next: natsmw.Handler) -> None:
                reads.append(time.monotonic())
                if len(reads) == 1:
                    asyncio.get_running_loop().call_later(0.05, cluster.servers[victim].stop)
                await call_next(msg)

            @compose(natsmw.middleware(stop_during_the_first_read), resolver)
            async def handle(msg: Msg) -> None:
                await handled.put(msg)
                await msg.ack()

            reader = await connect(cluster.urls[0])
            try:
                await reader.js.subscribe(
                    "cl.big", durable="r", cb=handle, manual_ack=True,
                    config=ConsumerConfig(ack_wait=30),
                )  # fmt: skip
                (got,) = await handled.wait_for(1, timeout=60)
                assert got.data == body
                # Read whole at the first try, or naked and read again: never a wrong body.
                assert len(reads) == 1 + resolver.stats.naked
            finally:
                await reader.nc.close()
        finally:
            await conn.nc.close()


async def test_a_read_cut_short_by_its_timeout_leaves_no_subscription_behind(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=MB, bucket=unique_bucket())
    await natsmw.publish(conn.js, stream.subject, os.urandom(20 * MB), claim_check=check)
    spy = await spy_acks(conn.nc, stream.name)
    # 5 ms: a 20 MB read took less than 20 ms once, on CI (a warm page cache)
    resolver = with_claim_check(timeout=0.005, nak_delay=0.05)

    @resolver
    async def handle(msg: Msg) -> None:
        raise AssertionError("a 20 MB read cannot take 5 ms here")

    before = len(conn.nc._subs)
    # max_deliver=3: the second nak waits an hour (the last delivery is spared), so nothing
    # is being read once two naks are in.
    await conn.js.subscribe(
        stream.subject, durable="short", cb=handle, manual_ack=True,
        config=ConsumerConfig(max_deliver=3),
    )  # fmt: skip
    settlements = await naks_of(spy, conn, 2)
    assert all(s.startswith(b"-NAK") for s in settlements)
    assert resolver.stats.naked == 2
    assert len(conn.nc._subs) == before + 1  # the consumer's: each read's own went with it
    await conn.js.delete_consumer(stream.name, "short")
    await conn.js.delete_object_store(check.bucket)


async def test_a_bucket_deleted_after_first_use_is_made_again(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    await natsmw.publish(conn.js, stream.subject, b"a" * 100, claim_check=check)
    await conn.js.delete_object_store(check.bucket)
    ack = await natsmw.publish(conn.js, stream.subject, b"b" * 100, claim_check=check)
    claim = Claim.from_header((await stored_headers(conn, stream, ack.seq))[1][CLAIM_HEADER])
    store = await conn.js.object_store(check.bucket)
    assert (await store.get(claim.name)).data == b"b" * 100
    await conn.js.delete_object_store(check.bucket)


async def test_an_existing_bucket_that_keeps_objects_shorter_than_the_ttl_is_named(
    conn: Connection, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = unique_bucket()
    await conn.js.create_object_store(bucket, config=ObjectStoreConfig(ttl=60))
    with caplog.at_level(logging.WARNING, logger="natsmw.claim"):
        await natsmw.publish(
            conn.js, stream.subject, b"c" * 100, claim_check=ClaimCheck(threshold=10, bucket=bucket)
        )
    assert f"object store {bucket!r} keeps objects 60s, less than" in caplog.text
    await conn.js.delete_object_store(bucket)


async def test_many_consumers_reading_one_large_body_at_once_keep_their_connection(
    conn: Connection, stream: Stream
) -> None:
    """Twenty reads of 20 MB at once on one connection outran the server's pending limit for
    a client (64 MB), and it closed the connection; reads now take turns, four at a time."""
    check = ClaimCheck(threshold=MB, bucket=unique_bucket())
    body = os.urandom(20 * MB)
    await natsmw.publish(conn.js, stream.subject, body, claim_check=check)
    handled = Inbox()

    @with_claim_check(timeout=60)
    async def handle(msg: Msg) -> None:
        await handled.put(msg)
        await msg.ack()

    for n in range(20):
        await conn.js.subscribe(stream.subject, durable=f"many{n}", cb=handle, manual_ack=True)
    got = await handled.wait_for(20, timeout=120)
    assert all(m.data == body for m in got)
    del got, handled.items[:]
    assert not conn.reconnected.is_set()  # the connection was never dropped
    assert conn.errors == []
    await conn.js.delete_object_store(check.bucket)


async def test_a_subject_of_any_length_makes_a_claim_its_consumers_accept(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    handled = Inbox()

    @with_claim_check()
    async def handle(msg: Msg) -> None:
        await handled.put(msg)
        await msg.ack()

    await conn.js.subscribe(f"{stream.name.lower()}.>", durable="long", cb=handle, manual_ack=True)
    for subject in (f"{stream.name.lower()}.{'a' * 1000}", f"{stream.name.lower()}.{'é' * 700}"):
        await natsmw.publish(conn.js, subject, b"long" * 100, claim_check=check)
    got = await handled.wait_for(2)
    assert [m.data for m in got] == [b"long" * 100] * 2
    await conn.js.delete_object_store(check.bucket)


async def test_the_default_bucket_keeps_objects_seven_days(
    conn: Connection, stream: Stream
) -> None:
    check = ClaimCheck(threshold=10)  # the README's defaults
    await natsmw.publish(conn.js, stream.subject, b"d" * 100, claim_check=check)
    info = await conn.js.stream_info("OBJ_natsmw_claims")
    assert info.config.max_age == 7 * 24 * 3600
    await conn.js.delete_object_store("natsmw_claims")


async def test_publish_not_before_takes_a_claim_check_too(conn: Connection, stream: Stream) -> None:
    check = ClaimCheck(threshold=10, bucket=unique_bucket())
    body = os.urandom(50_000)
    ran: list[tuple[bytes, float]] = []
    done = asyncio.Event()

    @compose(with_delay_cap(0.2, parking=False), with_claim_check())
    async def handle(msg: Msg) -> None:
        ran.append((msg.data, time.time()))
        await msg.ack()
        done.set()

    await conn.js.subscribe(stream.subject, durable="later", cb=handle, manual_ack=True)
    sent = time.time()
    await natsmw.publish_not_before(
        conn.js, stream.subject, body, not_before=1.0, claim_check=check
    )
    await asyncio.wait_for(done.wait(), 10)
    assert ran[0][0] == body
    assert ran[0][1] >= sent + 1.0  # not before its deadline
    await conn.js.delete_object_store(check.bucket)


async def test_a_core_message_whose_body_cannot_be_had_is_dropped_with_an_error(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    called = Inbox()
    resolver = with_claim_check()

    @resolver
    async def handle(msg: Msg) -> None:
        await called.put(msg)

    missing = Claim("claims_nowhere", "x/1", 10, "SHA-256=AAAA").header()
    with caplog.at_level(logging.ERROR, logger="natsmw.claim"):
        await conn.nc.subscribe("core.claims", cb=handle)
        await flushed(conn.nc)
        await conn.nc.publish("core.claims", b"", headers={CLAIM_HEADER: missing})
        await conn.nc.publish("core.claims", b"plain")  # behind it: the first is done then
        (got,) = await called.wait_for(1)
    assert got.data == b"plain"
    assert resolver.stats.dropped == 1
    assert "claim_missing" in caplog.text
    assert "core NATS message cannot be kept" in caplog.text
