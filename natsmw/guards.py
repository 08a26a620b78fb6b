"""Size guards: oversized messages never reach the handler, and are never lost.

    @with_size_limit(max_body=1 << 20, max_headers=64)
    async def handle(msg): ...

A JetStream message over a limit is, by default, copied to a dead-letter subject; once the
server has stored the copy the original is terminated. If the copy cannot be stored, the
original is naked instead, to come back later. Core NATS messages have nothing to settle:
they are dropped, with a log line and a counter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from natsmw._throttle import Throttled
from natsmw.chain import Decorator, Handler, layer
from natsmw.delay.limits import ConsumerLimits
from natsmw.duration import Duration, to_seconds
from natsmw.headers import (
    LazyHeadersMixin,
    Undecoded,
    header_block_size,
    header_count,
    peek_header,
    sendable_name,
)
from natsmw.message import MessageProxy

__all__ = [
    "LAST_CHANCE_DELAY",
    "OversizeAction",
    "Rejection",
    "SizeGuard",
    "SizeGuardStats",
    "with_size_limit",
]

log = logging.getLogger("natsmw.guards")

OversizeAction = Literal["dead_letter", "term", "nak"]
_ACTIONS = ("dead_letter", "term", "nak")

LAST_CHANCE_DELAY = 3600.0
"""The nak delay before a message's last allowed delivery, when it can be neither handled nor
copied: an hour for an operator to fix the cause (say, a missing dead-letter stream)."""

# The original's own Nats-* headers (Msg-Id, TTL, Rollup, Expected-*, ...) would make the
# server refuse, expire, deduplicate or roll up the copy: they travel renamed.
_SERVER_HEADER = "nats-"
CLAIM_HEADER = "Natsmw-Claim"  # natsmw.claim's: a body sent by reference
_CLAIM_NAME = CLAIM_HEADER.encode()


@dataclass(frozen=True)
class Rejection:
    """Why a message was refused: which ``limit``, the measured ``size`` and the ``maximum``."""

    limit: Literal[
        "body", "header_bytes", "header_count",
        # from with_claim_check: a body sent by reference that cannot be had
        "claim_size", "claim_missing", "claim_corrupt", "claim_invalid", "claim_unreachable",
    ]  # fmt: skip
    size: int
    maximum: int


@dataclass
class SizeGuardStats:
    """What one [`SizeGuard`][SizeGuard] did: ``rejected`` in all, and what became of them.

    ``stranded``: naked on their last allowed delivery (``max_deliver``) because no copy could
    be stored; they stay in their stream, but their consumer will not deliver them again.
    """

    rejected: int = 0
    dead_lettered: int = 0
    dead_letter_failures: int = 0
    termed: int = 0
    naked: int = 0
    dropped: int = 0
    stranded: int = 0


def with_size_limit(
    *,
    max_body: int | None = None,
    max_header_bytes: int | None = None,
    max_headers: int | None = None,
    on_oversize: OversizeAction = "dead_letter",
    dead_letter_subject: str = "natsmw.dead_letter.{stream}",
    nak_delay: Duration = 30.0,
    measure_referenced: bool = True,
) -> SizeGuard:
    """Keep messages over a size limit away from the handler.

    Args:
        max_body: most bytes of body a handler may get.
        max_header_bytes: most bytes of header block (``NATS/1.0`` line included).
        max_headers: most header lines.
        on_oversize: for JetStream messages: ``"dead_letter"`` (copy, then ``term`` once the
            copy is stored; ``nak`` if it cannot be), ``"term"`` (no copy) or ``"nak"``.
        dead_letter_subject: where copies go; ``{stream}``, ``{consumer}`` and ``{subject}``
            are filled in. A stream must capture it, or copies fail and originals are naked.
        nak_delay: the delay of the naks above (seconds or ``timedelta``).
        measure_referenced: for a message whose body travels by reference (a
            ``Natsmw-Claim`` header, see [`with_claim_check`][natsmw.with_claim_check]), hold
            ``max_body`` against the size of the referenced body, which the handler will
            get, rather than the near-empty body on the wire.

    Raises:
        ValueError: no limit given, a negative limit, an unknown ``on_oversize``, or a
            ``dead_letter_subject`` with an unknown placeholder.
        TypeError: a limit that is not an ``int``, or a bad ``nak_delay``.
    """
    return SizeGuard(
        max_body=max_body,
        max_header_bytes=max_header_bytes,
        max_headers=max_headers,
        on_oversize=on_oversize,
        dead_letter_subject=dead_letter_subject,
        nak_delay=nak_delay,
        measure_referenced=measure_referenced,
    )


class SizeGuard(Decorator):
    """The size-guard middleware; build it with [`with_size_limit`][with_size_limit]."""

    def __init__(
        self,
        *,
        max_body: int | None,
        max_header_bytes: int | None,
        max_headers: int | None,
        on_oversize: OversizeAction,
        dead_letter_subject: str,
        nak_delay: Duration,
        measure_referenced: bool = True,
    ) -> None:
        if not isinstance(measure_referenced, bool):
            raise TypeError(f"measure_referenced must be True or False, got {measure_referenced!r}")
        limits = {"max_body": max_body, "max_header_bytes": max_header_bytes}
        limits["max_headers"] = max_headers
        for name, value in limits.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a number of bytes or lines (int), got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be zero or more, got {value!r}")
        if all(value is None for value in limits.values()):
            raise ValueError("with_size_limit needs max_body, max_header_bytes or max_headers")
        if on_oversize not in _ACTIONS:
            raise ValueError(f"on_oversize must be one of {_ACTIONS}, got {on_oversize!r}")
        try:
            dead_letter_subject.format(stream="S", consumer="C", subject="s")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"dead_letter_subject may use {{stream}}, {{consumer}} and {{subject}}, "
                f"got {dead_letter_subject!r} ({error!r})"
            ) from None
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        # A body by reference is measured from its claim header: only with a body limit.
        self._referenced = measure_referenced and max_body is not None
        self._counts_only = max_header_bytes is None
        self._body_limit = math.inf if max_body is None else max_body
        self._count_limit = math.inf if max_headers is None else max_headers
        self.on_oversize = on_oversize
        self.dead_letter_subject = dead_letter_subject
        self.nak_delay = to_seconds(nak_delay, "nak_delay")
        self.stats = SizeGuardStats()
        self._limits = ConsumerLimits()
        self._warnings = Throttled(log)

    # Read-only: the fast path of _step keeps what these were when the guard was built.
    @property
    def max_body(self) -> int | None:
        """The largest body let through, in bytes (``None``: any)."""
        return self._max_body

    @property
    def max_header_bytes(self) -> int | None:
        """The largest header block let through, in bytes (``None``: any)."""
        return self._max_header_bytes

    @property
    def max_headers(self) -> int | None:
        """The most headers let through (``None``: any)."""
        return self._max_headers

    def _wrap(self, handler: Handler) -> Handler:
        return layer(self._step, passes=self._passes)(handler)

    def check(self, msg: Msg) -> Rejection | None:
        """The first limit ``msg`` breaks, measured without decoding its headers; or ``None``."""
        if isinstance(msg, MessageProxy):
            msg = msg.message  # read the message itself: 3x faster than through the proxy
        return self._check(msg)

    def _check(self, msg: Msg) -> Rejection | None:
        # The fields, not their properties: on every message of a lazy-headers client.
        max_body, max_headers = self._max_body, self._max_headers
        max_header_bytes = self._max_header_bytes
        body = len(msg.data)
        if self._referenced:
            claim = peek_header(msg, CLAIM_HEADER)
            if claim is not None:
                body = max(body, _claimed_size(claim))
        if max_body is not None and body > max_body:
            return Rejection("body", body, max_body)
        if max_header_bytes is not None:
            size, count = header_block_size(msg)
            if size > max_header_bytes:
                return Rejection("header_bytes", size, max_header_bytes)
        elif max_headers is not None:
            count = header_count(msg)  # the count alone is cheaper than the size
        else:
            return None
        if max_headers is not None and count > max_headers:
            return Rejection("header_count", count, max_headers)
        return None

    def _passes(self, real: Msg) -> bool:
        """Whether ``real`` (the message, not its proxy) is within every limit: handed on
        unchanged. On every message: the chain's fused coroutine asks it."""
        if self._counts_only:
            if type(real) is Msg:
                # A plain nats-py message's headers are a dict already: most messages pass on
                # two len() calls, without _check's.
                headers = real.headers
                if len(real.data) <= self._body_limit and (
                    not headers
                    or (
                        len(headers) <= self._count_limit
                        and not (self._referenced and CLAIM_HEADER in headers)
                    )
                ):
                    return True
            elif isinstance(real, LazyHeadersMixin):
                # Lazy headers still undecoded: counted in the raw block as header_count does;
                # a block that does not even hold the claim header's name has no claim.
                block = real._natsmw_headers
                if (
                    type(block) is Undecoded
                    and len(real.data) <= self._body_limit
                    and block.raw.count(b"\r\n") - 2 <= self._count_limit
                    and not (self._referenced and _CLAIM_NAME in block.raw)
                ):
                    return True
        return self._check(real) is None

    def _step(self, msg: MessageProxy, call_next: Handler) -> Awaitable[None]:
        # Not a coroutine itself: a message that passes is handed on as the next layer's
        # awaitable, without a frame of its own.
        real = msg.__wrapped__
        if self._passes(real):
            return call_next(msg)
        rejection = self._check(real)
        if rejection is None:  # never, after _passes said no: for the type checker
            return call_next(msg)
        return self._reject(msg, rejection)

    async def _reject(self, msg: MessageProxy, rejection: Rejection) -> None:
        self.stats.rejected += 1
        action = self.on_oversize if msg.is_jetstream else "drop"
        msg.report(
            "natsmw.guard.rejected",
            {"natsmw.guard.limit": rejection.limit, "natsmw.guard.size": rejection.size,
             "natsmw.guard.maximum": rejection.maximum, "natsmw.guard.action": action},
        )  # fmt: skip
        if not msg.is_jetstream:
            self.stats.dropped += 1
            log.warning("dropped core message on %s: %s", msg.subject, _describe(rejection))
            return
        if self.on_oversize == "term":
            await msg.term()
            self.stats.termed += 1
            log.warning("terminated %s: %s", _where(msg), _describe(rejection))
        elif self.on_oversize == "nak":
            await self._keep(msg, rejection, "naked")
        else:
            await self._dead_letter(msg, rejection)

    async def _keep(self, msg: MessageProxy, rejection: Rejection, what: str) -> None:
        """Nak the message so that it comes back, without spending its last delivery.

        Every delivery counts toward the consumer's ``max_deliver``: a nak on the last one
        ends the message's life on this consumer. So the nak before the last delivery waits
        long ([`LAST_CHANCE_DELAY`][LAST_CHANCE_DELAY]), and on the last one natsmw says, loudly,
        where the message stays.
        """
        stream, consumer, sequence, delivery = msg.position
        limits = await self._limits.read(
            msg.message._client, stream, consumer, msg.metadata.domain or None,
            # fresh enough to see max_deliver lowered between two naks of one message, and
            # shared by the messages of the consumer: not one request per delivery
            max_age=max(self.nak_delay / 2, 0.1),
        )  # fmt: skip
        left = None if limits.max_deliver is None else limits.max_deliver - delivery
        delay = self.nak_delay
        if left is not None and left <= 0:
            self.stats.stranded += 1
            log.error(
                "%s: %s, and this was its last delivery (max_deliver=%s): no nak can keep it on "
                "consumer %s. It is not deleted: it stays in stream %s at sequence %d until the "
                "stream's limits remove it; copy it from there",
                _where(msg), _describe(rejection), limits.max_deliver, consumer, stream, sequence,
            )  # fmt: skip
            msg.report(
                "natsmw.guard.stranded", {"natsmw.guard.max_deliver": limits.max_deliver or 0}
            )
        elif left == 1:
            delay = max(delay, LAST_CHANCE_DELAY)
            log.error(
                "%s %s for %.0fs: %s; one delivery is left (max_deliver=%s), so it waits long "
                "for the cause to be fixed",
                what, _where(msg), delay, _describe(rejection), limits.max_deliver,
            )  # fmt: skip
        else:
            self._warnings.warning(
                "kept", "%s %s for %.1fs: %s", what, _where(msg), delay, _describe(rejection)
            )
        await msg.nak(delay)
        self.stats.naked += 1

    async def _dead_letter(self, msg: MessageProxy, rejection: Rejection) -> None:
        meta = msg.metadata
        subject = self.dead_letter_subject.format(
            stream=meta.stream, consumer=meta.consumer, subject=msg.subject
        )
        headers = {sendable_name(_renamed(k)): v for k, v in (msg.headers or {}).items()}
        # Unique per consumer and per stream generation (a stream recreated under the same
        # name restarts its sequences, but not its store times): a duplicate answer then can
        # only mean this very copy was stored before (the term after it was lost).
        stored = round(meta.timestamp.timestamp() * 1e6)
        headers.update(
            {
                "Nats-Msg-Id": (
                    f"natsmw-dead-letter:{meta.stream}:{meta.consumer}:"
                    f"{meta.sequence.stream}:{stored}"
                ),
                "Natsmw-Rejected-Limit": rejection.limit,
                "Natsmw-Rejected-Size": str(rejection.size),
                "Natsmw-Rejected-Maximum": str(rejection.maximum),
                "Natsmw-Original-Subject": msg.subject,
                "Natsmw-Original-Stream": meta.stream,
                "Natsmw-Original-Consumer": meta.consumer,
                "Natsmw-Original-Sequence": str(meta.sequence.stream),
            }
        )
        try:
            js = msg.message._client.jetstream()
            ack = await js.publish(subject, msg.data, headers=headers)
        except (NatsError, asyncio.TimeoutError, OSError) as error:
            self.stats.dead_letter_failures += 1
            log.error(
                "could not store a dead-letter copy of %s on %s (%r): keeping the original",
                _where(msg), subject, error,
            )  # fmt: skip
            msg.report(
                "natsmw.guard.dead_letter_failed", {"natsmw.guard.dead_letter_subject": subject}
            )
            await self._keep(msg, rejection, "naked")
            return
        if ack.duplicate:
            log.info("the dead-letter copy of %s was stored before", _where(msg))
        await msg.term()
        self.stats.dead_lettered += 1
        msg.report("natsmw.guard.dead_lettered", {"natsmw.guard.dead_letter_subject": subject})
        log.warning("moved %s to %s: %s", _where(msg), subject, _describe(rejection))


def _claimed_size(value: str) -> int:
    # The size field alone; a header that is not a claim is with_claim_check's to refuse.
    if len(value) > 4096:
        return 0
    try:
        size = json.loads(value).get("size")
    except (ValueError, AttributeError, RecursionError):
        return 0
    return size if type(size) is int else 0


def _renamed(name: str) -> str:
    if name.lower().startswith(_SERVER_HEADER):
        return f"Natsmw-Original-{name[len(_SERVER_HEADER) :]}"
    return name


def _where(msg: MessageProxy) -> str:
    meta = msg.metadata
    return f"{msg.subject} ({meta.stream} seq {meta.sequence.stream})"


def _describe(rejection: Rejection) -> str:
    if rejection.limit.startswith("claim_"):
        return f"{rejection.limit}: its body of {rejection.size} bytes by reference cannot be had"
    return f"{rejection.limit} {rejection.size} over the limit of {rejection.maximum}"
