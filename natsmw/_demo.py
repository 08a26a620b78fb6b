"""``python -m natsmw demo``: natsmw at work on real messages, against an embedded server."""

from __future__ import annotations

import asyncio
import json

import nats
from nats.aio.msg import Msg

from natsmw.chain import Handler, Middleware, middleware
from natsmw.message import MessageProxy, Settle, Settlement
from natsmw.server import NatsServer

ORDERS = [{"id": 1, "amount": 20}, {"id": 2, "amount": 250}, {"id": 3, "amount": 70}]


def say(text: str) -> None:
    print(text, flush=True)


def narrated() -> Middleware:
    """A middleware that tells what happens to each delivery, from the outside of the handler."""

    async def step(msg: MessageProxy, call_next: Handler) -> None:
        meta = msg.metadata
        say(
            f"  -> stream message #{meta.sequence.stream} on {msg.subject}, "
            f"delivery {meta.num_delivered}: calling the handler"
        )

        async def report(settlement: Settlement, send: Settle) -> object:
            say(f"     the handler settled it: {describe(settlement)}")
            return await send(settlement)

        with msg.intercept(report):
            await call_next(msg)

    return middleware(step)


def describe(settlement: Settlement) -> str:
    if settlement.kind == "nak":
        return "nak (the server will deliver it again)"
    return settlement.kind


async def run_demo() -> int:
    with NatsServer() as server:
        say(f"Started an embedded nats-server with JetStream at {server.url}")
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        say("Created stream ORDERS (subjects orders.>) and a durable push consumer 'billing'")

        done = asyncio.Event()
        billed: list[int] = []

        # A legacy handler, unchanged: it asks for a second look at large orders.
        @narrated()
        async def bill(msg: Msg) -> None:
            order = json.loads(msg.data)
            if order["amount"] > 100 and msg.metadata.num_delivered == 1:
                await msg.nak()
                return
            billed.append(order["id"])
            await msg.ack()
            if len(billed) == len(ORDERS):
                done.set()

        await js.subscribe("orders.>", durable="billing", cb=bill, manual_ack=True)
        say(f"Publishing {len(ORDERS)} orders; the handler runs through the natsmw chain:")
        for order in ORDERS:
            await js.publish("orders.new", json.dumps(order).encode())
        await asyncio.wait_for(done.wait(), timeout=10)
        say(f"Done: orders {sorted(billed)} billed, each acked once; order 2 was nak'd once first.")
        await nc.drain()
    say("Stopped the embedded server and removed its temporary store.")
    return 0
