"""Holds decided before the chain makes its proxy (the delay cap's screen), and first
deliveries run in the chain's one coroutine (its fused path): in memory, on nats-py messages
whose client records what is published. Pure logic: which layers may let a message skip
them, and which must see it."""

from __future__ import annotations

import gc
import json
import sys
import time
import weakref
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg

import natsmw.delay.cap as cap_module
from natsmw import Handler, MessageProxy, compose, middleware, with_size_limit
from natsmw.delay import DeadlineKey, MemoryDeadlineStore, with_delay_cap
from natsmw.errors import ParkError

STORED = time.time_ns()


class Recorder:
    """Just enough of a nats-py client: what is published, and a consumer's info."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        self.published.append((subject, payload))

    def jetstream(self, **_: Any) -> Recorder:
        return self

    async def consumer_info(self, *_: Any, **__: Any) -> Any:
        return SimpleNamespace(
            config=SimpleNamespace(max_deliver=-1, durable_name="c", ack_policy=None),
            created=datetime.fromtimestamp(STORED / 1e9 - 60, timezone.utc),
        )


def delivery(
    client: Recorder, number: int, body: bytes = b"x", sequence: int = 7, cseq: int = 0
) -> Msg:
    """Delivery ``number`` of message ``sequence``, the consumer's ``cseq``-th (by default,
    ``number``: the consumer's deliveries are this message's)."""
    return Msg(
        _client=client,  # type: ignore[arg-type]
        subject="jobs",
        reply=f"$JS.ACK.S.c.{number}.{sequence}.{cseq or number}.{STORED}.0",
        data=body,
        headers={"Nats-Msg-Id": "7"},
    )


async def run(handler: Handler, msg: Msg) -> None:
    await handler(msg)


async def defer(msg: Msg) -> None:
    await msg.nak(delay=3600)


async def test_a_held_redelivery_is_naked_without_reaching_the_handler() -> None:
    client = Recorder()
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    handler = cap(defer)
    await run(handler, delivery(client, 1))
    await run(handler, delivery(client, 2))
    await run(handler, delivery(client, 3))
    naks = [payload for subject, payload in client.published if subject.startswith("$JS.ACK.")]
    assert len(naks) == 3
    assert all(p.startswith(b"-NAK ") for p in naks)
    assert cap.stats.holds == 2
    assert cap.stats.capped == 1


async def test_a_guard_outside_still_checks_a_held_redelivery() -> None:
    """The guard passes the first delivery; a redelivery over its limit (here: a body grown
    in memory, as a tightened limit would see it) is the guard's, not held by the cap."""
    client = Recorder()
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    guard = with_size_limit(max_body=10, on_oversize="term")
    handler = compose(guard, cap)(defer)
    await run(handler, delivery(client, 1))
    await run(handler, delivery(client, 2))  # held
    await run(handler, delivery(client, 3, body=b"x" * 11))  # over the guard's limit
    sent = [payload for subject, payload in client.published if subject.startswith("$JS.ACK.")]
    assert len(sent) == 3
    assert all(p.startswith(b"-NAK ") for p in sent[:2])
    assert sent[2] == b"+TERM"
    assert cap.stats.holds == 1
    assert guard.stats.termed == 1


async def test_a_middleware_outside_the_cap_sees_every_hold() -> None:
    client = Recorder()
    seen: list[int] = []

    async def spy(msg: MessageProxy, call_next: Handler) -> None:
        seen.append(msg.metadata.num_delivered)
        await call_next(msg)

    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    handler = compose(middleware(spy), cap)(defer)
    for number in (1, 2, 3):
        await run(handler, delivery(client, number))
    assert seen == [1, 2, 3]
    assert cap.stats.holds == 2


async def test_a_first_delivery_beside_held_ones_leaves_nothing_remembered_once_acked() -> None:
    """With a message held, a new one still takes the first delivery's short way; if its
    handler's long nak is remembered but never reaches the server, and it then acks, the
    memory forgets it (as the long way did)."""

    class FailsOneNak(Recorder):
        failed = False

        async def publish(self, subject: str, payload: bytes = b"", **kwargs: Any) -> None:
            if payload.startswith(b"-NAK") and self.published and not self.failed:
                self.failed = True
                raise ConnectionError("a nak lost on its way")
            await super().publish(subject, payload, **kwargs)

    client = FailsOneNak()
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())

    async def handle(msg: Msg) -> None:
        try:
            await msg.nak(delay=3600)
        except ConnectionError:
            await msg.ack()

    handler = cap(handle)
    await run(handler, delivery(client, 1, sequence=7))  # deferred: remembered
    assert len(cap._memory) == 1
    second = delivery(client, 1, sequence=8, cseq=2)
    await run(handler, second)  # its nak fails, then acked
    assert client.failed
    assert client.published[-1] == (second.reply, b"")  # an ack
    assert len(cap._memory) == 1


def frames_between(bottom: str) -> list[str]:
    """The functions between the caller's frame and the nearest frame of ``bottom``."""
    names = []
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != bottom:
        names.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_code.co_name}")
        frame = frame.f_back
    return names


async def test_a_first_delivery_runs_in_the_chains_one_coroutine_and_its_long_nak_is_capped() -> (
    None
):
    """A guard outside the cap only passes messages on: the chain checks its limits in place
    and calls the handler from one coroutine, with the cap's interceptor on the proxy."""
    client = Recorder()
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    stacks: list[list[str]] = []

    async def handle(msg: Msg) -> None:
        stacks.append(frames_between("run"))
        assert isinstance(msg, MessageProxy)
        await msg.nak(delay=3600)

    handler = compose(with_size_limit(max_body=10, max_headers=5), cap)(handle)
    await run(handler, delivery(client, 1, sequence=7))  # the long way: the consumer is read
    await run(handler, delivery(client, 1, sequence=8, cseq=2))
    assert stacks[1] == ["cap.py:handle"], stacks
    assert len(stacks[0]) > 1  # the first message of a consumer takes the long way
    naks = [payload for subject, payload in client.published if subject.startswith("$JS.ACK.")]
    assert len(naks) == 2
    delays = [json.loads(payload.removeprefix(b"-NAK "))["delay"] / 1e9 for payload in naks]
    assert all(0.8 <= delay <= 1.0 for delay in delays), delays  # the cap, less its jitter
    assert cap.stats.capped == 2


async def test_a_guard_outside_the_cap_still_rejects_a_first_delivery() -> None:
    client = Recorder()
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    guard = with_size_limit(max_body=10, on_oversize="term")
    handled: list[bytes] = []

    async def handle(msg: Msg) -> None:
        handled.append(msg.data)
        await msg.ack()

    handler = compose(guard, cap)(handle)
    await run(handler, delivery(client, 1, sequence=7, body=b"fine"))  # the consumer is read
    await run(handler, delivery(client, 1, sequence=8, cseq=2, body=b"x" * 11))
    await run(handler, delivery(client, 1, sequence=9, cseq=3, body=b"also fine"))
    sent = [payload for subject, payload in client.published if subject.startswith("$JS.ACK.")]
    assert sent == [b"", b"+TERM", b""]  # ack, term, ack
    assert handled == [b"fine", b"also fine"]
    assert guard.stats.termed == 1


def test_a_dropped_delay_cap_is_freed_at_once() -> None:
    """A cap holds stores (and their clients) and its memory: nothing of its own may refer to
    it, or it would wait for the cyclic collector."""
    cap = with_delay_cap(1.0, store=MemoryDeadlineStore())
    freed = weakref.ref(cap)
    gc.disable()
    try:
        del cap
        assert freed() is None
    finally:
        gc.enable()


async def test_a_failed_listing_of_parked_messages_is_tried_again_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer made again lists what an earlier one parked once; a failed listing is not
    kept for the whole generation (each message would then go the long way), nor tried
    again for every message."""
    clock = [100.0]  # the cap's monotonic clock, moved by hand
    monkeypatch.setattr(cap_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    class Parks:
        asked = 0

        async def sequences(self, stream: str, consumer: str) -> set[int]:
            self.asked += 1
            if self.asked == 1:
                raise ParkError("the server did not answer")
            return {7}

    parks = Parks()
    generation = cap_module._Generation(0.0, 0)
    key = DeadlineKey("S", "c", 7)
    assert await generation.parked_listed(parks, key) is None  # type: ignore[arg-type]
    assert await generation.parked_listed(parks, key) is None  # type: ignore[arg-type]
    assert parks.asked == 1
    assert generation.parked is None  # the hot path keeps away meanwhile
    clock[0] += cap_module._PARKED_RETRY - 0.01
    assert await generation.parked_listed(parks, key) is None  # type: ignore[arg-type]
    assert parks.asked == 1  # still within the window
    clock[0] += 0.01
    assert await generation.parked_listed(parks, key) == {7}  # type: ignore[arg-type]
    assert generation.parked == {7}
    assert parks.asked == 2
