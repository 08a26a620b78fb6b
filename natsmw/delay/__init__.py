"""The delay cap: long naks are parked or held; the handler waits for the real deadline."""

from natsmw.delay.cap import DelayCap, DelayCapStats, handler_calls, with_delay_cap
from natsmw.delay.deadline import (
    DEADLINE_HEADER,
    deadline_header,
    format_deadline,
    parse_deadline,
    publish_not_before,
)
from natsmw.delay.park import (
    PARK_STREAM,
    PARKED_HEADER,
    DueMsg,
    Parked,
    ParkedServing,
    serve_parked,
)
from natsmw.delay.stores import (
    DeadlineKey,
    DeadlineStore,
    Deferral,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
    replaces,
)

__all__ = [
    "DEADLINE_HEADER",
    "PARKED_HEADER",
    "PARK_STREAM",
    "DeadlineKey",
    "DeadlineStore",
    "Deferral",
    "DelayCap",
    "DelayCapStats",
    "DueMsg",
    "KeyValueDeadlineStore",
    "MemoryDeadlineStore",
    "Parked",
    "ParkedServing",
    "deadline_header",
    "format_deadline",
    "handler_calls",
    "parse_deadline",
    "publish_not_before",
    "replaces",
    "serve_parked",
    "with_delay_cap",
]
