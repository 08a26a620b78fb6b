"""The Natsmw-Deadline header and deferral records: pure tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from natsmw.delay import DEADLINE_HEADER, Deferral, deadline_header, format_deadline, parse_deadline


def test_format_and_parse_round_trip_in_utc() -> None:
    when = datetime(2026, 11, 26, 15, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    text = format_deadline(when)
    assert text == "2026-11-26T13:30:00.123456Z"
    assert parse_deadline(text) == when


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T15:30:00Z", datetime(2026, 11, 26, 15, 30, tzinfo=timezone.utc)),
        ("2026-11-26t15:30:00.5z", datetime(2026, 11, 26, 15, 30, 0, 500000, tzinfo=timezone.utc)),
        ("2026-11-26 16:30:00+01:00", datetime(2026, 11, 26, 15, 30, tzinfo=timezone.utc)),
        ("2026-11-26T15:30:00.123456789Z",
         datetime(2026, 11, 26, 15, 30, 0, 123456, tzinfo=timezone.utc)),
    ],
)  # fmt: skip
def test_parse_accepts_rfc3339(text: str, expected: datetime) -> None:
    assert parse_deadline(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "tomorrow", "2026-11-26T15:30:00", "2026-13-01T00:00:00Z", "2026-11-26",
     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:00", "2026-11-26T15:30:00Z junk"],
)  # fmt: skip
def test_parse_refuses_anything_else_with_a_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=DEADLINE_HEADER) as caught:
        parse_deadline(text)
    assert repr(text) in str(caught.value)


def test_deadline_header_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        deadline_header(datetime(2026, 11, 26, 15, 30))


@pytest.mark.parametrize("bad", [-1, float("nan"), "soon"])
def test_deadline_header_refuses_a_bad_delay(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="not_before"):
        deadline_header(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"{}", b"[]", b"not json", b'{"deadline": "soon"}', b'{"deadline": 1, "released_at": "3"}',
     b'{"deadline": 1, "deferred_at": -1}', b'{"deadline": true}'],
)  # fmt: skip
def test_deferral_records_are_validated(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a natsmw deferral record"):
        Deferral.from_bytes(data)


def test_deferral_skips_count_only_deliveries_before_release() -> None:
    deferral = Deferral(deadline=0.0, deferred_at=2, skipped_before=1, released_at=7)
    assert Deferral.from_bytes(deferral.to_bytes()) == deferral
    assert deferral.skipped(7) == 1 + 4  # deliveries 3..6 were holds
    assert deferral.skipped(9) == 1 + 4  # 8 and 9 reached the handler
    assert not deferral.fits(delivery=6, stored_at=0.0)  # released later than this delivery
