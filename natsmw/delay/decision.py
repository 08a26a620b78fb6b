"""The delay cap's decisions, as pure functions of what is known: no server, no clock.

Like tenacity's ``wait_*``/``stop_*`` strategies, these say *what* to do with a delivery or a
handler's nak; ``cap.py`` gathers the facts and carries the decision out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from natsmw.delay.limits import Limits

__all__ = [
    "BLIND_HOLD",
    "RESTORE_MARGIN",
    "SLACK",
    "Hold",
    "NakDecision",
    "Park",
    "Run",
    "Send",
    "blind_hold",
    "delivery_decision",
    "hold_for",
    "hold_interval",
    "nak_decision",
]

SLACK = 0.005
"""Added to a nak meant to land on the deadline: the server's timer starts after "now" was
measured, and a redelivery a hair early would cost one more hold (and one more delivery)."""

RESTORE_MARGIN = 1.0
"""Added to a nak that leads to a consumer's last allowed delivery. nats-server stores nak
timers to the second, so after a restart or a leader change a redelivery can come up to a
second early; on the last delivery there is no nak left to hold it with."""


@dataclass(frozen=True, slots=True)
class Run:
    """Call the handler. ``forced``: before a known (or unknown) deadline, because no nak is
    safe (``max_deliver`` leaves no delivery, or cannot be read); ``remaining`` is then the
    time left, ``None`` if unknown."""

    forced: bool = False
    remaining: float | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """Nak for ``nak`` seconds without calling the handler. ``stretched``: longer than the cap,
    so that the deliveries ``max_deliver`` leaves cover the time that remains."""

    nak: float
    stretched: bool = False


@dataclass(frozen=True, slots=True)
class Park:
    """Park the message in the server's scheduler until its deadline; ack the original."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send the handler's nak as it asked (``uncapped``: although it is over the cap)."""

    uncapped: bool = False


NakDecision: TypeAlias = "Send | Hold | Park"
_RUN = Run()
_PARK = Park()
_SEND = Send()


def hold_for(
    remaining: float, *, cap: float, jitter: float, draw: float, delivery: int, limits: Limits
) -> Hold | None:
    """The hold that covers ``remaining`` seconds from delivery ``delivery``.

    ``None`` when no nak is safe: this may be the consumer's last allowed delivery. ``draw``
    is a random number in [0, 1) that picks the jitter.

    >>> hold_for(10.0, cap=1.0, jitter=0.0, draw=0.5, delivery=1, limits=Limits(None, True))
    Hold(nak=1.0, stretched=False)
    >>> hold_for(10.0, cap=1.0, jitter=0.0, draw=0.5, delivery=1, limits=Limits(4, True))
    Hold(nak=5.0, stretched=True)
    """
    interval = hold_interval(remaining, cap, jitter, draw, delivery, limits)
    return None if interval is None else Hold(*interval)


def hold_interval(
    remaining: float, cap: float, jitter: float, draw: float, delivery: int, limits: Limits
) -> tuple[float, bool] | None:
    """`hold_for`'s nak and whether it is stretched, as a plain pair: the delay cap's usual
    hold calls it on every redelivery, where building the `Hold` costs as much as deciding.

    >>> hold_interval(10.0, 1.0, 0.0, 0.5, 1, Limits(4, True))
    (5.0, True)
    """
    if not limits.known:
        return None
    max_deliver = limits.max_deliver
    left = None if max_deliver is None else max_deliver - delivery
    if left is not None and left <= 0:
        return None
    if left == 1:
        # The next delivery is the last: nothing can hold it again if it comes early (after
        # a server restart it can, by up to a second), so it lands a margin past the deadline.
        return remaining + RESTORE_MARGIN, remaining + RESTORE_MARGIN > cap
    interval = cap if cap < remaining else remaining
    if interval < remaining and jitter:
        interval *= 1 - jitter * draw
    stretched = False
    if left is not None and remaining / (left - 1) > interval:
        # Survival over the cap: spread what remains over the deliveries left, one kept in
        # reserve for a redelivery that comes early, so the handler still runs after the
        # deadline.
        interval = remaining / (left - 1)
        stretched = True
    if interval < remaining:
        return interval, stretched
    # The last hold lands just past the deadline, and never past the cap: a redelivery a few
    # milliseconds short of the deadline is simply held once more.
    if stretched:
        return remaining + SLACK, True
    landing = remaining + SLACK
    return (cap if cap < landing else landing), False


BLIND_HOLD = 1.0
"""The first blind hold (seconds): a redelivery whose deadline cannot be read (the store is
unreachable) is held this long, then twice as long at each delivery, up to the cap. Most
such redeliveries were never deferred (a handler error, ``ack_wait``, a consumer's
``backoff``): they wait a second or two, not a whole cap."""


def blind_hold(cap: float, delivery: int) -> float:
    """How long to hold delivery ``delivery`` of a message whose deadline is unknown.

    >>> [blind_hold(60.0, d) for d in (2, 3, 4, 9, 500)]
    [1.0, 2.0, 4.0, 60.0, 60.0]
    """
    doublings = max(delivery - 2, 0)
    if doublings >= 32:
        return cap
    return min(cap, BLIND_HOLD * 2.0**doublings)


def delivery_decision(
    remaining: float | None,
    *,
    cap: float,
    park_after: float | None,
    jitter: float,
    draw: float,
    delivery: int,
    limits: Limits,
) -> Run | Hold | Park:
    """What to do with a delivery whose deadline is ``remaining`` seconds away.

    ``remaining`` is zero or less when the deadline has passed (or there is none), ``None``
    when it is unknown (the store is unreachable: hold blind, see `blind_hold`). ``park_after`` is
    ``None`` when this message cannot be parked.
    """
    if remaining is not None and remaining <= 0:
        return _RUN
    if remaining is not None and park_after is not None and remaining > park_after:
        return _PARK
    if remaining is None:
        cap = blind_hold(cap, delivery)  # held this long, as if that were the time left
    hold = hold_for(
        cap if remaining is None else remaining,
        cap=cap,
        jitter=jitter,
        draw=draw,
        delivery=delivery,
        limits=limits,
    )
    return Run(forced=True, remaining=remaining) if hold is None else hold


def nak_decision(
    delay: float | None,
    *,
    cap: float,
    park_after: float | None,
    jitter: float,
    draw: float,
    delivery: int,
    limits: Limits,
) -> NakDecision:
    """What to do with a handler's ``nak(delay)`` (``None``: a plain nak)."""
    if delay is None or delay <= cap:
        return _SEND
    if park_after is not None and delay > park_after:
        return _PARK
    hold = hold_for(delay, cap=cap, jitter=jitter, draw=draw, delivery=delivery, limits=limits)
    return Send(uncapped=True) if hold is None else hold
