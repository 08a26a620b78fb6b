"""The park tier: a long nak leaves the consumer, and comes back to the same handler on time.

Run it with ``python examples/parking.py`` after ``pip install -e '.[demo]'``. A legacy handler
asks for a 3 s delay (think: 3 hours) on a consumer with ``max_ack_pending=1``; under
``install(nc, chain=...)`` the message is parked in the server's scheduler, so the next order
is handled at once instead of waiting behind it.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from natsmw import handler_calls, install, with_delay_cap
from natsmw.server import NatsServer

DELAY = 3.0
started = time.time()
done = asyncio.Event()


def say(text: str) -> None:
    print(f"{time.time() - started:5.2f}s  {text}", flush=True)


async def handle(msg: Msg) -> None:  # the handler you already have, unchanged
    if msg.data == b"review" and handler_calls(msg) == 1:
        say(f"{msg.data.decode()}: the handler asks for nak(delay={DELAY})")
        await msg.nak(delay=DELAY)
        return
    say(f"{msg.data.decode()}: handled (call {handler_calls(msg)}, subject {msg.subject})")
    await msg.ack()
    if msg.data == b"review":
        done.set()


async def main() -> None:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        cap = with_delay_cap(1.0)
        install(nc, chain=cap)  # serves due messages of the subscriptions made from now on
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        await js.subscribe(
            "orders.new", durable="billing", cb=handle, manual_ack=True,
            config=ConsumerConfig(max_ack_pending=1),
        )  # fmt: skip
        await js.publish("orders.new", b"review")
        await js.publish("orders.new", b"small")
        await asyncio.wait_for(done.wait(), timeout=20)
        info = await js.consumer_info("ORDERS", "billing")
        say(f"parked {cap.stats.parked}, back {cap.stats.unparked}, holds {cap.stats.holds}; "
            f"the consumer's ack-pending now: {info.num_ack_pending}")  # fmt: skip
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
