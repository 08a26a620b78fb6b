"""natsmw: composable middlewares between nats-py and the message handlers you already have."""

from natsmw.chain import Handler, Middleware, compose, middleware
from natsmw.message import MessageProxy, Settlement

__all__ = [
    "Handler",
    "MessageProxy",
    "Middleware",
    "Settlement",
    "compose",
    "middleware",
]
