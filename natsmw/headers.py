"""Lazy header decoding: a message's headers are parsed when someone reads them, not before.

nats-py parses every message's headers in its read loop (``Client._process_headers``),
before any handler runs: about 20 µs for 20 headers. With [`natsmw.install`][natsmw.install] a
client keeps the raw header block instead, and ``msg.headers`` parses it on first access, with
nats-py's own parser, so the result is exactly what nats-py would have given: the same
``dict`` (or ``None``), keys, values and types.

Middlewares that need a single header call [`peek_header`][peek_header], which finds it in the raw
block without decoding the rest.
"""

from __future__ import annotations

import inspect
import re
import urllib.parse
from collections.abc import (
    Awaitable,
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from typing import Any, NoReturn, TypeAlias

from nats.aio import client as nats_client
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = [
    "header_block_size",
    "header_count",
    "lazy_message_class",
    "original_name",
    "peek_header",
    "sendable_name",
]

# The protocol's header line; natsmw.install checks that nats-py's NATS_HDR_LINE is the same.
_HDR_LINE = b"NATS/1.0"
_HDR_LINE_SIZE = len(_HDR_LINE)
_CRLF = b"\r\n"
_SPACE = 32
# With fast_mail_parser installed nats-py parses through it, and may suspend to report an
# error; natsmw then leaves decoding to nats-py, so that results stay exactly the same.
_NATS_USES_MAIL_PARSER = getattr(nats_client, "parse_email", None) is not None
_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
_Parser: TypeAlias = Callable[[bytes], Awaitable[dict[str, str] | None]]


class Undecoded(Mapping[str, str]):
    """A header block nats-py has not parsed yet; stands where nats-py puts its ``dict``.

    A read-only mapping of the headers the block holds: anything that reads it (``h[name]``,
    ``get``, ``in``, iteration, ``len``, ``keys``/``items``/``values``, ``==`` with a dict)
    parses the block once, with nats-py's own parser, and answers from that ``dict``. Where
    nats-py would have given ``None`` (no header line it can read), it is an empty mapping.
    ``bool`` answers from the raw block when its first line is an ordinary header (nats-py
    asks it of every JetStream message), and parses otherwise.

    nats-py's read loop is the one to see it: it asks JetStream messages with an empty body
    whether they are control messages. ``msg.headers`` is a plain ``dict`` as ever.

        >>> h = Undecoded(Client()._process_headers, b"NATS/1.0\\r\\nA: 1\\r\\n\\r\\n")
        >>> h["A"], dict(h), h == {"A": "1"}
        ('1', {'A': '1'}, True)

    Raises:
        TypeError: on any write (``h[k] = v``, ``del``, ``update``, ``pop`` ...): the block is
            what the server sent; change ``msg.headers``, a ``dict``, instead.
    """

    __slots__ = ("_decoded", "_parse", "raw")

    def __init__(self, parse: _Parser, raw: bytes) -> None:
        """``parse`` is nats-py's ``_process_headers`` of the client that received ``raw``."""
        self._parse = parse
        self.raw = raw
        self._decoded: dict[str, str] | _NotYet | None = _NOT_YET

    def decode(self) -> dict[str, str] | None:
        """What nats-py's parser gives for the block (parsed on the first call only).

        Raises:
            RuntimeError: nats-py's parser suspended or is not a coroutine function: a
                nats-py that [`natsmw.install`][natsmw.install] would have refused (it checks this).
        """
        decoded = self._decoded
        if isinstance(decoded, _NotYet):
            decoded = self._decoded = finish_now(self._parse(self.raw))
        return decoded

    def _headers(self) -> dict[str, str]:
        return self.decode() or _EMPTY

    def __getitem__(self, name: str) -> str:
        return self._headers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __contains__(self, name: object) -> bool:
        return name in self._headers()

    def __bool__(self) -> bool:
        if self._decoded is _NOT_YET and _FIRST_LINE_IS_A_HEADER(self.raw, _FIRST_HEADER_AT):
            # nats-py asks ``if hdr:`` of every JetStream message: a first line that nats-py's
            # parser turns into a header answers it without parsing the block.
            return True
        return bool(self._headers())

    def get(self, name: str, default: Any = None) -> Any:
        return self._headers().get(name, default)

    def keys(self) -> KeysView[str]:
        return self._headers().keys()

    def items(self) -> ItemsView[str, str]:
        return self._headers().items()

    def values(self) -> ValuesView[str]:
        return self._headers().values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Undecoded):
            other = other._headers()
        if isinstance(other, dict):
            return self._headers() == other
        if isinstance(other, Mapping):
            return self._headers() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a dict, so unhashable like one

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.decode()!r})"

    def _refuse(self, *_: object, **__: object) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} headers are read-only (the raw block {self.raw!r} as the "
            "server sent it); change msg.headers, a dict, instead"
        )

    __setitem__ = __delitem__ = _refuse
    update = pop = popitem = setdefault = clear = _refuse


class _NotYet:
    """The type of ``_NOT_YET``: an ``Undecoded`` not parsed yet (``None`` is a result)."""


_NOT_YET = _NotYet()
_EMPTY: dict[str, str] = {}
_FIRST_HEADER_AT = _HDR_LINE_SIZE + len(_CRLF)
# A first line nats-py's parser makes a header of: a name of printable ASCII but ":" (it
# strips the name, decodes it as ASCII, and drops names with whitespace inside), then ":".
_FIRST_LINE_IS_A_HEADER = re.compile(rb"[!-9;-~]+[ \t]*:").match


def finish_now(coroutine: Any) -> dict[str, str] | None:
    """Run nats-py's header parser (or natsmw's hook in front of it) to completion now: a
    coroutine that returns without suspending.

    Raises:
        RuntimeError: ``coroutine`` is not one, or it suspended.
    """
    if not inspect.iscoroutine(coroutine):
        raise RuntimeError(
            f"nats-py's header parser returned {coroutine!r}, not a coroutine: this nats-py "
            "cannot decode lazily (install() checks this, and leaves decoding eager)"
        )
    try:
        coroutine.send(None)
    except StopIteration as finished:
        decoded: dict[str, str] | None = finished.value
        return decoded
    # nats-py only suspends to report a parse error to the error callback, and only with
    # fast_mail_parser, under which natsmw never defers decoding (see can_defer).
    coroutine.close()
    raise RuntimeError("nats-py's header parser suspended; lazy decoding cannot run it")


def unusable_parser(client: Client) -> str | None:
    """Why lazy decoding cannot stand in front of ``client``'s header parser, or ``None``.

    natsmw relies on nats-py's read loop awaiting ``client._process_headers(raw)``, a
    coroutine function taking the raw block, and on the block starting with the protocol's
    ``NATS/1.0`` (nats-py's ``NATS_HDR_LINE``). A nats-py refactor of either would make
    lazy decoding lose messages, so [`natsmw.install`][natsmw.install] asks this first.
    """
    line = getattr(nats_client, "NATS_HDR_LINE", None)
    if line is None or bytes(line) != _HDR_LINE:
        return f"nats.aio.client.NATS_HDR_LINE is {line!r}, not {_HDR_LINE!r}"
    parse = getattr(client, "_process_headers", None)
    if not inspect.iscoroutinefunction(parse):
        return f"Client._process_headers is {parse!r}, not a coroutine function"
    try:
        signature = inspect.signature(parse)
    except (TypeError, ValueError) as error:
        return f"the signature of Client._process_headers cannot be read ({error})"
    parameters = list(signature.parameters.values())
    if [(p.name, p.kind) for p in parameters] != [("headers", _POSITIONAL_OR_KEYWORD)]:
        names = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters)
        return f"Client._process_headers takes ({names}), not (headers)"
    return None


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
        # type(), not isinstance(): Undecoded is a Mapping, and an ABC's isinstance check
        # costs two calls on every read of a decoded message's headers.
        if type(value) is Undecoded:
            value = self._natsmw_headers = value.decode()
        return value  # type: ignore[return-value]  # never an Undecoded here

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
    # isinstance sees through proxies (natsmw's is a subclass; a wrapt proxy forwards it).
    if not isinstance(msg, LazyHeadersMixin):
        return None
    return _raw_block(msg)


def _raw_block(msg: Msg) -> Undecoded | None:
    """The undecoded headers of a message of a lazy class, if still undecoded (natsmw's proxy
    shares the message's attributes; another library's proxy passes the read on)."""
    value = getattr(msg, "_natsmw_headers", None)
    return value if type(value) is Undecoded else None


_peekable: dict[str, bytes] = {}  # names checked already, encoded


def peek_header(msg: Msg, name: str) -> str | None:
    """The value ``msg.headers.get(name)`` would return, without decoding the other headers.

    Works on any message; the saving comes when lazy headers are installed on its client.
    """
    # On every message, up to three times (the delay cap's deadline, the size guard's claim,
    # the handler's own): one isinstance and, on a lazy message, one attribute read, no call.
    undecoded = msg._natsmw_headers if isinstance(msg, LazyHeadersMixin) else None
    if type(undecoded) is not Undecoded:
        headers = msg.headers
        return headers.get(name) if headers else None
    wanted = _peekable.get(name)
    if wanted is None:
        if not name.isascii() or any(char.isspace() for char in name):
            return None  # nats-py's parser never yields such a name
        wanted = name.encode("ascii")
        if len(_peekable) < 256:  # the few names middlewares peek at, on every message
            _peekable[name] = wanted
    raw = undecoded.raw
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
    # See peek_header.
    undecoded = msg._natsmw_headers if isinstance(msg, LazyHeadersMixin) else None
    if type(undecoded) is Undecoded:
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
    [`original_name`][original_name] restores every name exactly."""
    if _SENDABLE.fullmatch(name):
        return name
    return _UNSENDABLE_CHAR.sub(
        lambda match: "".join(f"%{byte:02X}" for byte in match[0].encode()), name
    )


def original_name(name: str) -> str:
    """The name [`sendable_name`][sendable_name] encoded."""
    return urllib.parse.unquote(name) if "%" in name else name
