"""The smallest natsmw example: an existing nats-py handler, decorated, on an embedded server.

Run it with ``python examples/legacy_handler.py`` after ``pip install -e '.[demo]'``.
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.msg import Msg

from natsmw import Handler, MessageProxy, compose, middleware
from natsmw.server import NatsServer

handled = asyncio.Event()


async def log_deliveries(msg: MessageProxy, call_next: Handler) -> None:
    print(f"delivery {msg.metadata.num_delivered} of {msg.subject}: {msg.data!r}")
    await call_next(msg)
    print(f"settled with: {msg.settlement.kind if msg.settlement else 'nothing yet'}")
    handled.set()


@compose(middleware(log_deliveries))
async def handle(msg: Msg) -> None:  # the handler you already have, unchanged
    await msg.ack()


async def main() -> None:
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="EVENTS", subjects=["events.>"])
        await js.subscribe("events.>", durable="worker", cb=handle, manual_ack=True)
        await js.publish("events.created", b"hello")
        await asyncio.wait_for(handled.wait(), timeout=10)
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
