"""Push consume + ack throughput: raw nats-py against natsmw, on one embedded server, one run.

    python -m bench.consume [--messages N] [--rounds R] [--headers H ...]

The handler reads one header, then acks. A warm-up round drains every variant once and is not
counted; then the variants run interleaved, round after round, in an order that rotates from
round to round so that none always runs first. Each variant's rate and consumer CPU per
message are compared with raw nats-py's in the same round; the figures are the medians of
those ratios over the rounds, with their range. Results go to bench/results/consume.json.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.common import Handler, Variant, compare, hand_written_chain, write_report
from natsmw import (
    MessageProxy,
    compose,
    install,
    middleware,
    peek_header,
    with_delay_cap,
    with_size_limit,
)


async def read_dict(msg: Msg) -> None:
    _ = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    await msg.ack()


async def read_peek(msg: Msg) -> None:
    _ = peek_header(msg, "Nats-Msg-Id")
    await msg.ack()


async def _pass(msg: MessageProxy, call_next: Handler) -> None:
    await call_next(msg)


def proxy_only(handler: Handler) -> Handler:
    """One middleware that does nothing: the floor any natsmw chain pays (proxy, one layer)."""
    return middleware(_pass)(handler)


def full_chain(handler: Handler) -> Handler:
    return compose(with_size_limit(max_body=1 << 20, max_headers=1000), with_delay_cap(60))(handler)


def hand_written(handler: Handler, *, proxy: bool = False) -> Handler:
    return hand_written_chain(handler, 60, proxy=proxy)


def lazy(handler: Handler) -> object:
    def prepare(nc: Client) -> Handler:
        install(nc)
        return handler

    return prepare


VARIANTS = [
    Variant("raw nats-py, headers as dict", lambda nc: read_dict),
    Variant("lazy install, headers as dict", lazy(read_dict)),  # type: ignore[arg-type]
    Variant("lazy install, peek_header", lazy(read_peek)),  # type: ignore[arg-type]
    Variant("one no-op middleware (the floor), eager", lambda nc: proxy_only(read_dict)),
    Variant("full chain (guard+cap), eager", lambda nc: full_chain(read_dict)),
    Variant("hand-written guard+cap checks, no proxy", lambda nc: hand_written(read_dict)),
    Variant("the same checks, natsmw's proxy", lambda nc: hand_written(read_dict, proxy=True)),
    Variant("full chain (guard+cap), lazy+peek", lazy(full_chain(read_peek))),  # type: ignore[arg-type]
]


async def run(messages: int, rounds: int, header_counts: list[int]) -> dict[str, object]:
    results: dict[str, object] = {}
    for headers in header_counts:
        results[f"{headers} headers"] = await compare(
            VARIANTS, messages=messages, rounds=rounds, headers=headers, title="push consume + ack"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # 100,000 messages a drain (about a second): with 20,000, one round's ratio moved by
    # ±25 % on this machine.
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--headers", type=int, nargs="+", default=[0, 2, 20])
    parser.add_argument("--out", type=Path, default=Path("bench/results/consume.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.messages, args.rounds, args.headers))
    write_report(args.out, "push consume + ack, handler reads one header", results,
                 unit="by_variant", messages=args.messages, rounds=args.rounds)  # fmt: skip


if __name__ == "__main__":
    main()
