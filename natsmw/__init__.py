"""natsmw: composable middlewares between nats-py and the message handlers you already have."""

from natsmw.chain import Handler, Middleware, compose, middleware
from natsmw.delay import (
    DEADLINE_HEADER,
    DelayCap,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
    handler_calls,
    publish_not_before,
    with_delay_cap,
)
from natsmw.message import MessageProxy, Settlement

__all__ = [
    "DEADLINE_HEADER",
    "DelayCap",
    "Handler",
    "KeyValueDeadlineStore",
    "MemoryDeadlineStore",
    "MessageProxy",
    "Middleware",
    "Settlement",
    "compose",
    "handler_calls",
    "middleware",
    "publish_not_before",
    "with_delay_cap",
]
