"""natsmw: composable middlewares between nats-py and the message handlers you already have."""

from natsmw.chain import Decorator, Handler, Middleware, compose, middleware
from natsmw.claim import CLAIM_HEADER, Claim, ClaimCheck, ClaimResolver, with_claim_check
from natsmw.delay import (
    DEADLINE_HEADER,
    DelayCap,
    KeyValueDeadlineStore,
    MemoryDeadlineStore,
    handler_calls,
    publish_not_before,
    serve_parked,
    with_delay_cap,
)
from natsmw.guards import SizeGuard, with_size_limit
from natsmw.headers import peek_header
from natsmw.installation import install, installed, uninstall
from natsmw.message import MessageProxy, Report, Settlement
from natsmw.tracing import Tracing, publish, with_tracing

__all__ = [
    "CLAIM_HEADER",
    "DEADLINE_HEADER",
    "Claim",
    "ClaimCheck",
    "ClaimResolver",
    "Decorator",
    "DelayCap",
    "Handler",
    "KeyValueDeadlineStore",
    "MemoryDeadlineStore",
    "MessageProxy",
    "Middleware",
    "Report",
    "Settlement",
    "SizeGuard",
    "Tracing",
    "compose",
    "handler_calls",
    "install",
    "installed",
    "middleware",
    "peek_header",
    "publish",
    "publish_not_before",
    "serve_parked",
    "uninstall",
    "with_claim_check",
    "with_delay_cap",
    "with_size_limit",
    "with_tracing",
]
