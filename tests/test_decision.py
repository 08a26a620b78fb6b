"""The delay cap's decisions, as pure functions: no server, no clock, table-driven."""

from __future__ import annotations

import pytest

from natsmw.delay.decision import (
    RESTORE_MARGIN,
    SLACK,
    Hold,
    Park,
    Run,
    Send,
    blind_hold,
    delivery_decision,
    hold_for,
    nak_decision,
)
from natsmw.delay.limits import UNKNOWN, Limits

UNLIMITED = Limits(max_deliver=None, durable=True)


def limit(max_deliver: int) -> Limits:
    return Limits(max_deliver=max_deliver, durable=True)


@pytest.mark.parametrize(
    ("remaining", "park_after", "delivery", "limits", "expected"),
    [
        (-1.0, 10.0, 2, UNLIMITED, Run()),  # due: run
        (0.0, 10.0, 2, UNLIMITED, Run()),  # due exactly: run
        (100.0, 10.0, 1, UNLIMITED, Park()),  # far ahead and parkable: park
        (100.0, None, 1, UNLIMITED, Hold(1.0)),  # far ahead, cannot park: hold for the cap
        (5.0, 10.0, 1, UNLIMITED, Hold(1.0)),  # under the threshold: hold
        (0.5, 10.0, 1, UNLIMITED, Hold(0.5 + SLACK)),  # the last hold lands on the deadline
        (10.0, None, 1, limit(4), Hold(5.0, stretched=True)),  # 3 left, one in reserve
        (10.0, None, 1, limit(3), Hold(10.0 + SLACK, stretched=True)),  # 2 left, one spare
        (0.5, None, 2, limit(3), Hold(0.5 + RESTORE_MARGIN, stretched=True)),  # next is last
        (0.5, None, 2, limit(30), Hold(0.5 + SLACK)),  # a spare delivery: on the deadline
        (10.0, None, 3, limit(3), Run(forced=True, remaining=10.0)),  # last delivery: run
        (10.0, None, 1, UNKNOWN, Run(forced=True, remaining=10.0)),  # limits never read
        (None, 10.0, 2, UNLIMITED, Hold(1.0)),  # unknown deadline: blind, for the cap
        (None, 10.0, 2, limit(2), Run(forced=True, remaining=None)),  # ... unless last
    ],
)
def test_delivery_decision(
    remaining: float | None,
    park_after: float | None,
    delivery: int,
    limits: Limits,
    expected: object,
) -> None:
    decision = delivery_decision(
        remaining, cap=1.0, park_after=park_after, jitter=0.0, draw=0.0,
        delivery=delivery, limits=limits,
    )  # fmt: skip
    assert decision == expected


@pytest.mark.parametrize(
    ("delay", "park_after", "delivery", "limits", "expected"),
    [
        (None, 1.0, 1, UNLIMITED, Send()),  # a plain nak goes as it is
        (0.5, 1.0, 1, UNLIMITED, Send()),  # under the cap
        (1.0, 1.0, 1, UNLIMITED, Send()),  # the cap itself
        (3600.0, 1.0, 1, UNLIMITED, Park()),  # long, parkable
        (3600.0, None, 1, UNLIMITED, Hold(1.0)),  # long, not parkable: capped
        (5.0, 10.0, 1, UNLIMITED, Hold(1.0)),  # between cap and threshold: capped
        (3600.0, None, 1, limit(1), Send(uncapped=True)),  # no delivery to hold with
        (3600.0, None, 1, UNKNOWN, Send(uncapped=True)),  # limits unknown: as asked
        (10.0, None, 1, limit(4), Hold(5.0, stretched=True)),
        (10.0, None, 1, limit(2), Hold(10.0 + RESTORE_MARGIN, stretched=True)),
    ],
)
def test_nak_decision(
    delay: float | None, park_after: float | None, delivery: int, limits: Limits, expected: object
) -> None:
    decision = nak_decision(
        delay, cap=1.0, park_after=park_after, jitter=0.0, draw=0.0,
        delivery=delivery, limits=limits,
    )  # fmt: skip
    assert decision == expected


def test_jitter_shortens_a_capped_hold_never_the_last_one() -> None:
    kept = hold_for(10.0, cap=1.0, jitter=0.1, draw=0.5, delivery=1, limits=UNLIMITED)
    last = hold_for(0.5, cap=1.0, jitter=0.1, draw=0.5, delivery=1, limits=UNLIMITED)
    assert kept == Hold(0.95)
    assert last == Hold(0.5 + SLACK)


@pytest.mark.parametrize("remaining", [0.999, 0.9999, 1.0])
def test_the_last_hold_never_exceeds_the_cap(remaining: float) -> None:
    """It lands just past the deadline, unless that would take it past the cap: then it is
    the cap, and a redelivery a hair short of the deadline is held once more."""
    decision = delivery_decision(
        remaining, cap=1.0, park_after=None, jitter=0.0, draw=0.0, delivery=2, limits=UNLIMITED
    )
    assert isinstance(decision, Hold)
    assert remaining <= decision.nak <= 1.0


def test_blind_holds_start_at_a_second_and_double_up_to_the_cap() -> None:
    """A redelivery whose deadline cannot be read was most likely never deferred (a handler
    error, ack_wait, a backoff): its first blind hold is short, not the whole cap."""

    def held(delivery: int) -> object:
        return delivery_decision(None, cap=60.0, park_after=None, jitter=0.0, draw=0.0,
                                 delivery=delivery, limits=UNLIMITED)  # fmt: skip

    holds = [held(delivery) for delivery in (2, 3, 4, 5, 8, 9, 10_000)]
    assert holds == [Hold(1.0), Hold(2.0), Hold(4.0), Hold(8.0), Hold(60.0), Hold(60.0), Hold(60.0)]
    assert blind_hold(0.5, 2) == 0.5  # never over the cap
