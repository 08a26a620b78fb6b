"""Lazy header decoding: a message's headers are parsed when someone reads them, not before.

nats-py parses every message's headers in its read loop (``Client._process_headers``),
before any handler runs: about 20 µs for 20 headers. With :func:`natsmw.install` a client
keeps the raw header block instead, and ``msg.headers`` parses it on first access, with
nats-py's own parser, so the result is exactly what nats-py would have given: the same
``dict`` (or ``None``), keys, values and types.

Middlewares that need a single header call :func:`peek_header`, which finds it in the raw
block without decoding the rest.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from nats.aio import client as nats_client
from nats.aio.client import Client
from nats.aio.msg import Msg
from wrapt import ObjectProxy

__all__ = [
    "header_block_size",
    "header_count",
    "lazy_message_class",
    "original_name",
    "peek_header",
    "sendable_name",
]

_HDR_LINE = bytes(nats_client.NATS_HDR_LINE)
_HDR_LINE_SIZE = len(_HDR_LINE)
_CRLF = b"\r\n"
_SPACE = 32
# With fast_mail_parser installed nats-py parses through it, and may suspend to report an
# error; natsmw then leaves decoding to nats-py, so that results stay exactly the same.
_NATS_USES_MAIL_PARSER = getattr(nats_client, "parse_email", None) is not None


class Undecoded:
    """A header block nats-py has not parsed yet; stands where nats-py puts its ``dict``.

    nats-py's read loop only looks into a message's headers to spot JetStream control
    messages, which have an empty body; for those ``get`` decodes, as nats-py would have.
    """

    __slots__ = ("_client", "raw")

    def __init__(self, client: Client, raw: bytes) -> None:
        self._client = client
        self.raw = raw

    def decode(self) -> dict[str, str] | None:
        """Parse with nats-py's own ``Client._process_headers``, run to completion now."""
        coroutine = Client._process_headers(self._client, self.raw)
        try:
            coroutine.send(None)
        except StopIteration as finished:
            decoded: dict[str, str] | None = finished.value
            return decoded
        # nats-py only suspends to report a parse error to the error callback, and only
        # with fast_mail_parser, under which natsmw never defers decoding (see is_lazy).
        coroutine.close()
        raise RuntimeError("nats-py's header parser suspended; lazy decoding cannot run it")

    def get(self, key: str, default: Any = None) -> Any:
        decoded = self.decode()
        return decoded.get(key, default) if decoded is not None else default


def can_defer(raw: bytes) -> bool:
    """Whether a header block may be decoded later: ordinary headers, no inline status.

    Status lines (heartbeats, flow control, 404/408/409 ...) and empty blocks are decoded at
    once: nats-py reads them in its read loop, and they are small.
    """
    return (
        not _NATS_USES_MAIL_PARSER
        and len(raw) > _HDR_LINE_SIZE + len(_CRLF)
        and raw[_HDR_LINE_SIZE] != _SPACE
    )


class LazyHeadersMixin:
    """Gives a ``Msg`` class a ``headers`` attribute decoded on first access."""

    _natsmw_headers: dict[str, str] | Undecoded | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        value = self._natsmw_headers
        if isinstance(value, Undecoded):
            value = self._natsmw_headers = value.decode()
        return value

    @headers.setter
    def headers(self, value: dict[str, str] | Undecoded | None) -> None:
        self._natsmw_headers = value


_lazy_classes: dict[type[Msg], type[Msg]] = {}


def lazy_message_class(base: type[Msg]) -> type[Msg]:
    """The subclass of ``base`` whose ``headers`` decode on first access (made once)."""
    if issubclass(base, LazyHeadersMixin):
        return base
    lazy = _lazy_classes.get(base)
    if lazy is None:
        lazy = type(f"Lazy{base.__name__}", (LazyHeadersMixin, base), {})
        _lazy_classes[base] = lazy
    return lazy


def _undecoded(msg: Msg) -> Undecoded | None:
    # isinstance sees through proxies (natsmw's or any other wrapt proxy) to the message; the
    # attribute is then read on the message itself, not through the proxy (3x faster).
    if not isinstance(msg, LazyHeadersMixin):
        return None
    message: object = msg
    while isinstance(message, ObjectProxy):
        message = message.__wrapped__
    value = getattr(message, "_natsmw_headers", None)
    return value if type(value) is Undecoded else None


def peek_header(msg: Msg, name: str) -> str | None:
    """The value ``msg.headers.get(name)`` would return, without decoding the other headers.

    Works on any message; the saving comes when lazy headers are installed on its client.
    """
    undecoded = _undecoded(msg)
    if undecoded is None:
        headers = msg.headers
        return headers.get(name) if headers else None
    if not name.isascii() or any(char.isspace() for char in name):
        return None  # nats-py's parser never yields such a name
    raw = undecoded.raw
    wanted = name.encode("ascii")
    if wanted not in raw:
        return None
    found = None
    # Same rules as nats-py's parser: the last duplicate wins; names are stripped and
    # compared exactly; values are stripped and decoded as UTF-8 with replacement.
    for line in raw[_HDR_LINE_SIZE + len(_CRLF) :].split(_CRLF):
        key, colon, value = line.partition(b":")
        if colon and key.strip() == wanted:
            found = value
    if found is None:
        return None
    return found.strip().decode("utf-8", "replace")


def header_block_size(msg: Msg) -> tuple[int, int]:
    """``(bytes, count)`` of a message's headers, from the raw block when it is at hand.

    Without lazy headers the block is rebuilt from the decoded dict, in bytes, as the client
    would send it: ``NATS/1.0\\r\\n``, then ``Name: Value\\r\\n`` per header, then ``\\r\\n``.
    """
    undecoded = _undecoded(msg)
    if undecoded is not None:
        return len(undecoded.raw), header_count(msg)
    headers = msg.headers or {}
    if not headers:
        return 0, 0
    lines = sum(len(k.encode()) + len(v.encode("utf-8", "replace")) + 4 for k, v in headers.items())
    return _HDR_LINE_SIZE + len(_CRLF) + lines + len(_CRLF), len(headers)


def header_count(msg: Msg) -> int:
    """How many headers ``msg`` has: header lines of the raw block when it is at hand."""
    undecoded = _undecoded(msg)
    if undecoded is not None:
        return max(undecoded.raw.count(_CRLF) - 2, 0)
    headers = msg.headers
    return len(headers) if headers else 0


# The header names nats-py will send (``Client._send_command`` refuses others with
# BadHeaderError); a message published by another client may carry any name the server took.
_SENDABLE = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")
_UNSENDABLE_CHAR = re.compile(r"[^!#$&'*+\-.^_`|~0-9A-Za-z]")


def sendable_name(name: str) -> str:
    """``name`` as a header name nats-py can send: characters it refuses, and ``%`` itself,
    percent-encoded (UTF-8). Names it can send (without ``%``) are returned unchanged, so
    :func:`original_name` restores every name exactly."""
    if _SENDABLE.fullmatch(name):
        return name
    return _UNSENDABLE_CHAR.sub(
        lambda match: "".join(f"%{byte:02X}" for byte in match[0].encode()), name
    )


def original_name(name: str) -> str:
    """The name :func:`sendable_name` encoded."""
    return urllib.parse.unquote(name) if "%" in name else name
