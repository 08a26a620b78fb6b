"""A consumer process for the multi-process delay-cap tests.

    python -m tests.delay_worker <url> <stream> <durable> <cap> <delay> [park]

Pulls from an existing durable; its legacy handler naks for <delay> on its first call for a
message (as counted by natsmw, across processes) and acks on the second. Prints one JSON line
per event on stdout: ready, call, deferred, and held (a delivery natsmw held). With ``park``
it also serves the consumer's due messages, so that long delays are parked. The environment
variable ``NATSMW_TEST_CLOCK_AHEAD`` (seconds, may be negative) puts its wall clock off.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import nats
from nats.aio.msg import Msg

from natsmw import Handler, MessageProxy, compose, middleware, serve_parked
from natsmw.delay import handler_calls, with_delay_cap

_true_time = time.time
_ahead = float(os.environ.get("NATSMW_TEST_CLOCK_AHEAD", "0") or 0)
if _ahead:
    # This host's wall clock is off by that much (natsmw must not trust it); events are
    # still reported in the true time, for the test to compare.
    time.time = lambda: _true_time() + _ahead


def emit(event: str, msg: Msg, **fields: object) -> None:
    record = {"event": event, "at": _true_time(), "seq": msg.metadata.sequence.stream, **fields}
    print(json.dumps(record), flush=True)


async def main(url: str, stream: str, durable: str, cap: float, delay: float, park: bool) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()

    async def report_holds(msg: MessageProxy, call_next: Handler) -> None:
        await call_next(msg)
        if not msg.state.get("ran"):
            emit("held", msg, num_delivered=msg.metadata.num_delivered)

    @compose(middleware(report_holds), with_delay_cap(cap, parking=park))
    async def handle(msg: Msg) -> None:
        msg.state["ran"] = True  # type: ignore[attr-defined]
        calls = handler_calls(msg)
        emit("call", msg, calls=calls, num_delivered=msg.metadata.num_delivered)
        if calls == 1:
            await msg.nak(delay=delay)
            emit("deferred", msg)
        else:
            await msg.ack()

    psub = await js.pull_subscribe_bind(durable, stream)
    if park:
        await serve_parked(js, handle, stream=stream, consumer=durable)
    print(json.dumps({"event": "ready"}), flush=True)
    while True:
        try:
            msgs = await psub.fetch(10, timeout=0.5)
        except (asyncio.TimeoutError, nats.errors.Error):
            continue
        for msg in msgs:
            await handle(msg)


if __name__ == "__main__":
    url, stream, durable, cap, delay = sys.argv[1:6]
    asyncio.run(main(url, stream, durable, float(cap), float(delay), sys.argv[6:7] == ["park"]))
