"""``natsmw deferred`` as an operator runs it (a subprocess against a real server), and
natsmw.ops under it: list, show, release and cancel held and parked messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import natsmw.delay.clock
from natsmw import DelayCap, handler_calls, ops, serve_parked, with_delay_cap
from natsmw.server import NatsCluster, NatsServer
from tests.conftest import (
    Connection,
    Stream,
    add_stream_when_ready,
    connect,
    publish_until_stored,
    spy_acks,
)

CAP = 0.3
LONG = 120.0  # a delay no test waits for


def natsmw_cli(*args: str, url: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natsmw", "deferred", *args, "--server", url],
        capture_output=True, text=True, timeout=60, input=stdin,
        env={**os.environ, "NATS_URL": ""},
    )  # fmt: skip


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@dataclass
class Deferring:
    """A legacy handler: naks each message for ``delay`` on its first call, acks it after."""

    delay: float = LONG
    calls: list[tuple[bytes, int]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __call__(self, msg: Msg) -> None:
        calls = handler_calls(msg)
        if calls == 1:
            await msg.nak(delay=self.delay)
        else:
            await msg.ack()
        async with self.changed:
            self.calls.append((msg.data, calls))
            self.changed.notify_all()

    async def wait(self, body: bytes, calls: int, timeout: float = 15.0) -> None:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: (body, calls) in self.calls), timeout
            )


async def recorded_held(conn: Connection, stream: str) -> None:
    """Wait until a held message's record is stored (it is written right after the nak)."""
    for _ in range(500):
        kv = await conn.js.stream_info("KV_natsmw_deadlines", subjects_filter=f"$KV.*.{stream}.>")
        if kv.state.subjects:
            return
        await asyncio.sleep(0.01)  # between two questions to the server
    raise AssertionError("the deferral was never stored")


async def recorded(conn: Connection, stream: str) -> None:
    """Wait until the held message's record and the parked one's schedule are stored: both
    are written right after the handler's nak."""
    for _ in range(500):
        kv = await conn.js.stream_info("KV_natsmw_deadlines", subjects_filter=f"$KV.*.{stream}.>")
        parked = await conn.js.stream_info("natsmw_parked", subjects_filter=f"*.*.{stream}.>")
        if kv.state.subjects and parked.state.subjects:
            return
        await asyncio.sleep(0.01)  # between two questions to the server
    raise AssertionError("the deferrals were never stored")


@contextlib.asynccontextmanager
async def deferred_both_ways(
    conn: Connection, stream: Stream
) -> AsyncIterator[tuple[Deferring, DelayCap, DelayCap]]:
    """``held`` deferred by consumer "holder" (no parking), ``parked`` by "parker"."""
    handler = Deferring()
    holding = with_delay_cap(CAP, parking=False)
    holding._recheck_held = 0.2  # an operator's change is read again within 0.2 s, not 30
    parking = with_delay_cap(CAP)
    held, parked = holding(handler), parking(handler)
    held_sub = await conn.js.subscribe(
        f"{stream.name.lower()}.held", durable="holder", cb=held, manual_ack=True
    )
    parked_sub = await conn.js.subscribe(
        f"{stream.name.lower()}.parked", durable="parker", cb=parked, manual_ack=True
    )
    serving = await serve_parked(conn.js, parked, stream=stream.name, consumer="parker")
    await asyncio.wait_for(serving.ready.wait(), 30)  # else the first long nak is held
    for order, kind in ((1, "held"), (2, "parked")):
        await publish_until_stored(
            conn, f"{stream.name.lower()}.{kind}", kind.encode(), msg_id=f"{stream.name}-{kind}",
            headers={"X-Order": str(order)},
        )  # fmt: skip
    await handler.wait(b"held", 1)
    await handler.wait(b"parked", 1)
    await recorded(conn, stream.name)
    try:
        yield handler, holding, parking
    finally:
        await serving.stop()
        await held_sub.unsubscribe()
        await parked_sub.unsubscribe()


async def test_list_shows_held_and_parked_messages_with_a_summary_per_consumer(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream):
        lines = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
    messages = {line["consumer"]: line for line in lines if line["type"] == "message"}
    assert set(messages) == {"holder", "parker"}
    held, parked = messages["holder"], messages["parker"]
    assert (held["tier"], held["subject"], held["handler_calls"]) == (
        "held", f"{stream.name.lower()}.held", 1)  # fmt: skip
    assert (parked["tier"], parked["subject"], parked["handler_calls"]) == (
        "parked", f"{stream.name.lower()}.parked", 1)  # fmt: skip
    for line in (held, parked):
        assert LONG - 10 < line["due_in"] <= LONG
        assert line["requested"] == LONG
    summaries = {line["consumer"]: line for line in lines if line["type"] == "consumer"}
    assert (summaries["holder"]["held"], summaries["parker"]["parked"]) == (1, 1)
    assert summaries["parker"]["overdue_for"] is None

    overdue = json_lines(natsmw_cli("list", "--overdue", "--json", url=nats_server.url))
    assert not [line for line in overdue if line.get("stream") == stream.name]


async def test_show_gives_headers_body_size_and_record(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream):
        for consumer, sequence, order in (("holder", 1, "1"), ("parker", 2, "2")):
            result = natsmw_cli(
                "show", stream.name, consumer, str(sequence), "--json", url=nats_server.url
            )
            shown = json_lines(result)[0]
            kind = "held" if consumer == "holder" else "parked"
            # the original's headers, its Nats-Msg-Id too (a parked one's restored)
            assert shown["headers"] == {"X-Order": order, "Nats-Msg-Id": f"{stream.name}-{kind}"}
            assert shown["body_size"] == len(b"held" if consumer == "holder" else b"parked")
            assert shown["record"]["deadline"] == pytest.approx(shown["message"]["deadline"])
            human = natsmw_cli("show", stream.name, consumer, str(sequence), url=nats_server.url)
            assert "X-Order: " + order in human.stdout
            assert "due in" in human.stdout


async def test_release_runs_a_parked_message_now_and_a_held_one_at_its_next_delivery(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream) as (handler, holding, _):
        started = time.monotonic()
        result = natsmw_cli("release", stream.name, "parker", "2", url=nats_server.url)
        assert result.returncode == 0, result.stderr
        assert "released" in result.stdout
        await handler.wait(b"parked", 2)
        result = natsmw_cli("release", stream.name, "holder", "1", url=nats_server.url)
        assert result.returncode == 0, result.stderr
        await handler.wait(b"held", 2)
        assert time.monotonic() - started < LONG / 4  # not at the deadline
        assert holding.stats.holds >= 1
        left = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
        assert not [line for line in left if line["type"] == "message"]


async def test_cancel_deletes_a_parked_message_and_terminates_a_held_one(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    spy = await spy_acks(conn.nc, stream.name)
    async with deferred_both_ways(conn, stream) as (handler, _, _):
        refused = natsmw_cli("cancel", stream.name, "parker", "2", url=nats_server.url, stdin="")
        assert refused.returncode == 2
        assert "--yes" in refused.stderr
        for consumer, sequence in (("parker", "2"), ("holder", "1")):
            cancel = ("cancel", stream.name, consumer, sequence, "--yes")
            result = natsmw_cli(*cancel, url=nats_server.url)
            assert result.returncode == 0, result.stderr
            again = natsmw_cli(*cancel, url=nats_server.url)
            assert again.returncode == 3  # not deferred any more, held or parked alike
        await spy.wait_for_settlement(1, b"+TERM")
        left = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
        assert not [line for line in left if line["type"] == "message"]
        # The parked one's schedule is gone: it can never fire.
        info = await conn.js.stream_info(
            "natsmw_parked", subjects_filter=f"natsmw.*.{stream.name}.>"
        )
        assert not info.state.subjects
    assert sorted(handler.calls) == [(b"held", 1), (b"parked", 1)]


async def test_errors_name_the_problem_with_exit_codes_scripts_can_rely_on(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with NatsServer() as empty:
        nothing = natsmw_cli("list", url=empty.url)
        assert nothing.returncode == 3
        assert "no natsmw data on this server" in nothing.stderr
    async with deferred_both_ways(conn, stream):
        unknown = natsmw_cli("list", "--stream", "NO_SUCH", url=nats_server.url)
        assert (unknown.returncode, "stream 'NO_SUCH' does not exist" in unknown.stderr) == (
            3,
            True,
        )
        not_deferred = natsmw_cli("show", stream.name, "holder", "99", url=nats_server.url)
        assert not_deferred.returncode == 3
        assert "is not deferred" in not_deferred.stderr
        usage = natsmw_cli("list", "--consumer", "holder", url=nats_server.url)
        assert usage.returncode == 2
        down = natsmw_cli("list", url="nats://127.0.0.1:1")
        assert down.returncode == 1
        assert "cannot connect" in down.stderr


async def test_human_output_reads_at_80_columns_in_a_terminal(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream):
        process, controller = in_terminal("list", url=nats_server.url)
        output = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 4096):
                output += chunk
        os.close(controller)
        assert process.wait(timeout=60) == 0
    lines = output.decode().splitlines()
    assert lines[0].split() == ["TIER", "STREAM/CONSUMER", "SEQ", "DUE", "IN", "CALLS", "SUBJECT"]
    assert all(len(line) <= 80 for line in lines), lines
    ours = [line for line in lines if stream.name in line]
    assert any(line.startswith("held ") for line in ours)
    assert any(line.startswith("parked ") for line in ours)
    assert f"{stream.name}/parker: 0 held, 1 parked, 0 due; next in" in "\n".join(ours)


async def test_on_a_three_node_cluster() -> None:
    async with NatsCluster() as cluster:
        conn = await connect(*cluster.urls)
        try:
            await add_stream_when_ready(conn, name="C", subjects=["c.>"], num_replicas=3)
            async with deferred_both_ways(conn, Stream("C", "c.work")) as (handler, _, _):
                url = cluster.urls[1]
                lines = json_lines(natsmw_cli("list", "--json", url=url))
                tiers = sorted(line["tier"] for line in lines if line["type"] == "message")
                assert tiers == ["held", "parked"]
                result = natsmw_cli("release", "C", "parker", "2", url=cluster.urls[2])
                assert result.returncode == 0, result.stderr
                await handler.wait(b"parked", 2)
        finally:
            await conn.nc.drain()


def gauge_values(reader: InMemoryMetricReader) -> dict[tuple[str, ...], float]:
    values: dict[tuple[str, ...], float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    attributes = point.attributes or {}
                    labels = (metric.name, *(str(v) for v in attributes.values()))
                    values[labels] = point.value  # type: ignore[union-attr]
    return values


async def test_gauges_count_deferred_messages_and_show_a_stranded_one(
    conn: Connection, stream: Stream
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    async with (
        deferred_both_ways(conn, stream),
        ops.DeferredGauges(conn.nc, every=60, meter_provider=provider),
    ):
        values = gauge_values(reader)
    assert values[("natsmw.deferred.messages", stream.name, "held")] == 1
    assert values[("natsmw.deferred.messages", stream.name, "parked")] == 1
    assert values[("natsmw.deferred.oldest_overdue", stream.name)] == 0

    # Nothing serves "parker" any more: released, its due copy is stranded.
    await ops.release(conn.nc, stream.name, "parker", 2)
    reader = InMemoryMetricReader()
    gauges = ops.DeferredGauges(conn.nc, meter_provider=MeterProvider(metric_readers=[reader]))
    for _ in range(200):
        await gauges.refresh()
        values = gauge_values(reader)
        if values.get(("natsmw.deferred.messages", stream.name, "due")) == 1:
            break
        await asyncio.sleep(0.05)  # the scheduler fires within a few ticks of 250 ms
    assert values[("natsmw.deferred.messages", stream.name, "due")] == 1
    assert values[("natsmw.deferred.messages", stream.name, "parked")] == 0
    assert values[("natsmw.deferred.oldest_overdue", stream.name)] > 0


async def test_release_all_of_one_consumer_leaves_the_others(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream) as (handler, _, _):
        result = natsmw_cli(
            "release", "--all", "--stream", stream.name, "--consumer", "parker", "--json", "--yes",
            url=nats_server.url,
        )  # fmt: skip
        released = json_lines(result)
        assert [(line["consumer"], line["sequence"]) for line in released] == [("parker", 2)]
        await handler.wait(b"parked", 2)
        left = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
        assert [line["consumer"] for line in left if line["type"] == "message"] == ["holder"]
        both = natsmw_cli("cancel", stream.name, "holder", url=nats_server.url)
        assert both.returncode == 2  # a message is named in full, or --all selects
        unconfirmed = natsmw_cli("release", "--all", url=nats_server.url, stdin="")
        assert (unconfirmed.returncode, "--yes" in unconfirmed.stderr) == (2, True)


async def test_a_stream_without_direct_gets_is_read_one_message_at_a_time(
    conn: Connection, stream: Stream
) -> None:
    """natsmw's streams made by an older natsmw do not allow direct gets: listing still
    reads them, slower. With direct gets, batches of a thousand."""
    for i in range(5):
        await conn.js.publish(stream.subject, str(i).encode())
    slow = [m.data async for m in ops._scan(conn.nc, stream.name, f"{stream.name.lower()}.>")]
    await conn.js.add_stream(name="DIRECT", subjects=["direct.>"], allow_direct=True)
    for i in range(2500):
        await conn.js.publish("direct.x", str(i).encode())
    fast = [m.data async for m in ops._scan(conn.nc, "DIRECT", "direct.>")]
    await conn.js.delete_stream("DIRECT")
    assert slow == [str(i).encode() for i in range(5)]
    assert fast == [str(i).encode() for i in range(2500)]


async def test_a_held_message_cancelled_just_before_its_deadline_never_runs(
    conn: Connection, stream: Stream
) -> None:
    """The holding instance re-reads a record every RECHECK_HELD; a cancel after its last
    re-read must still stop the run: a held message coming due reads its record once."""
    spy = await spy_acks(conn.nc, stream.name)
    handler = Deferring(delay=3.0)
    holding = with_delay_cap(CAP, parking=False, jitter=0.0)
    holding._recheck_held = 3600  # no re-read while it is held: only the one when due
    await conn.js.subscribe(stream.subject, durable="late", cb=holding(handler), manual_ack=True)
    await conn.js.publish(stream.subject, b"x")
    await handler.wait(b"x", 1)
    await recorded_held(conn, stream.name)
    await ops.cancel(conn.nc, stream.name, "late", 1)
    await spy.wait_for_settlement(1, b"+TERM", timeout=10)
    assert handler.calls == [(b"x", 1)]


async def test_release_all_lists_what_it_will_change_and_ctrl_c_at_the_question_changes_nothing(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream):
        process, controller = in_terminal("release", "--all", "--stream", stream.name,
                                          url=nats_server.url)  # fmt: skip
        output = await asked(controller)
        process.send_signal(signal.SIGINT)  # the operator changes their mind: Ctrl-C
        assert await asyncio.to_thread(process.wait, 60) == 130
        os.close(controller)
        text = output.decode()
        assert f"{stream.name}/holder seq 1" in text
        assert f"{stream.name}/parker seq 2" in text
        assert "Release these 2 message(s)? They run now. [y/N]" in text
        listed = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
        assert sorted(m["tier"] for m in listed if "tier" in m) == ["held", "parked"]

        # Asked again (a cancel always asks), the operator types y: done, exit 0.
        process, controller = in_terminal("cancel", stream.name, "parker", "2",
                                          url=nats_server.url)  # fmt: skip
        await asked(controller)
        os.write(controller, b"y\n")
        assert await asyncio.to_thread(process.wait, 60) == 0
        os.close(controller)
        left = json_lines(
            natsmw_cli("list", "--stream", stream.name, "--json", url=nats_server.url)
        )
        assert [m["tier"] for m in left if "tier" in m] == ["held"]


def in_terminal(*args: str, url: str) -> tuple[subprocess.Popen[bytes], int]:
    """``natsmw deferred *args`` in a pseudo-terminal 80 columns wide: the process and the
    terminal's controlling end (to read what it prints, and to type)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "natsmw", "deferred", *args, "--server", url],
        stdout=terminal, stderr=terminal, stdin=terminal,
        env={**os.environ, "COLUMNS": "80", "TERM": "xterm"},
    )  # fmt: skip
    os.close(terminal)
    return process, controller


async def asked(controller: int, timeout: float = 60.0) -> bytes:
    """What the terminal shows up to the confirmation question, once it is asked."""
    output = b""
    deadline = asyncio.get_running_loop().time() + timeout
    while b"[y/N]" not in output:
        assert asyncio.get_running_loop().time() < deadline, output
        output += await asyncio.to_thread(os.read, controller, 4096)
    return output


async def test_a_reader_that_stops_early_ends_the_listing_with_141_and_no_traceback(
    conn: Connection, stream: Stream, nats_server: NatsServer
) -> None:
    async with deferred_both_ways(conn, stream):
        process = subprocess.Popen(  # noqa: ASYNC220 (the test waits for nothing else)
            [sys.executable, "-m", "natsmw", "deferred", "list", "--server", nats_server.url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        process.stdout.close()  # as `| head -0` would: nothing more is read
        _, errors = await asyncio.to_thread(process.communicate, None, 60)
    assert process.returncode == 141
    assert b"Traceback" not in errors


async def test_a_release_from_a_host_whose_clock_is_ahead_runs_now_not_later(
    conn: Connection, stream: Stream, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's host is two minutes ahead: "now" is the server's, measured, or the
    released message would wait those two minutes out."""
    async with deferred_both_ways(conn, stream) as (handler, _, _):
        operator = await connect(nats_server.url)  # another host: a client of its own
        real_time = time.time
        with monkeypatch.context() as patched:
            patched.setattr(time, "time", lambda: real_time() + 120)
            started = time.monotonic()
            await ops.release(operator.nc, stream.name, "parker", 2)
            await ops.release(operator.nc, stream.name, "holder", 1)
            assert natsmw.delay.clock.server_clock.offset(operator.nc) > 100  # it measured
        await operator.nc.close()
        await handler.wait(b"parked", 2, timeout=20)
        await handler.wait(b"held", 2, timeout=20)
        assert time.monotonic() - started < 20  # not 120 s later
