"""The delay cap: long naks become short ones; the handler waits for the real deadline."""

from natsmw.delay.cap import DelayCap, DelayCapStats, handler_calls, with_delay_cap
from natsmw.delay.deadline import (
    DEADLINE_HEADER,
    deadline_header,
    format_deadline,
    parse_deadline,
    publish_not_before,
)
from natsmw.delay.stores import (
    DeadlineKey,
    DeadlineStore,
    Deferral,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
)

__all__ = [
    "DEADLINE_HEADER",
    "DeadlineKey",
    "DeadlineStore",
    "Deferral",
    "DelayCap",
    "DelayCapStats",
    "KeyValueDeadlineStore",
    "MemoryDeadlineStore",
    "deadline_header",
    "format_deadline",
    "handler_calls",
    "parse_deadline",
    "publish_not_before",
    "with_delay_cap",
]
