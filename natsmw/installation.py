"""A reversible, per-client install for legacy consumers: one line at start-up.

    install(nc)                                # lazy header decoding
    install(nc, chain=compose(with_delay_cap(60), with_size_limit(max_body=1 << 20)))

``install`` changes one client, and [`uninstall`][uninstall] undoes it. In the style of the
OpenTelemetry instrumentations, the client's methods are wrapped with ``wrapt`` on the instance,
so other clients in the process are untouched. JetStream contexts and pull subscriptions are
covered whenever they were made: while any client has a chain installed, four methods of
nats-py's classes (``JetStreamContext.subscribe`` and ``.pull_subscribe_bind``,
``PullSubscription.fetch`` and ``.unsubscribe``) are wrapped once, and each call looks up the
installation of its own client (nothing for a client without one); the last ``uninstall``
takes them out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import wrapt
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy

from natsmw.chain import Handler, Middleware, require_handler, require_middleware
from natsmw.delay.park import (
    DEFAULT_RETENTION,
    DueFetcher,
    ParkedServing,
    park_stream,
    stop_serving,
)
from natsmw.duration import Duration, to_seconds
from natsmw.errors import NatsmwError
from natsmw.headers import Undecoded, can_defer, finish_now, lazy_message_class, unusable_parser
from natsmw.message import RUNS_ELSEWHERE, MessageProxy

__all__ = ["FETCH_SETTLE_TIMEOUT", "install", "installed", "uninstall"]

FETCH_SETTLE_TIMEOUT = 300.0
"""By default, how long the chain around a fetched message waits for the caller to settle it
(``install(..., fetch_settle_timeout=)``)."""

# Callbacks nats-py installs for its own machinery: replies to requests, key-value and
# object-store watchers. A user's chain has no business with them.
_INTERNAL_MODULES = ("nats.js.kv", "nats.js.object_store")
log = logging.getLogger("natsmw.install")

SUPPORTED_NATS_PY = ">=2.15,<3"
"""The nats-py versions natsmw supports (its dependency in pyproject.toml): 2.15 brought the
byte-level header parser whose rules ``peek_header`` follows; 3 may change the internals
natsmw wraps."""

# What install pushes through the installed header hook, as nats-py's read loop would, before
# it trusts the hook with real messages: an ordinary block, and a status line. The UTF-8 value
# is decoded by the byte-level parser peek_header follows; nats-py's parser before 2.15 lost it.
_PROBE_BLOCK = b"NATS/1.0\r\nA: 1\r\nB: \xc3\xa9\r\n\r\n"
_PROBE_HEADERS = {"A": "1", "B": "\u00e9"}
_PROBE_STATUS_BLOCK = b"NATS/1.0 404 No Messages\r\n\r\n"


@dataclass
class _Installation:
    lazy_headers: bool
    chain: Middleware | None
    had_msg_class: bool
    msg_class: Any
    settle_timeout: float = FETCH_SETTLE_TIMEOUT
    # False once uninstalled: a wrapper of ours that another library wrapped in turn cannot be
    # taken out from under it, so it stays, and passes every call straight through.
    active: bool = True
    # What install put on the client: name -> (our wrapper, whether the client had its own
    # attribute of that name before, which our wrapper wraps).
    # Weakly: an installation kept in _installed must not keep its client alive.
    wrappers: dict[str, tuple[weakref.ref[Any], bool]] = field(default_factory=dict)
    # Subscriptions made before install whose callback it chained in place. They keep the
    # chain after uninstall.
    covered: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    # Pull subscriptions made before install, chained at their first fetch while installed.
    pulls: weakref.WeakKeyDictionary[Any, _CoveredPull] = field(
        default_factory=weakref.WeakKeyDictionary
    )


@dataclass
class _CoveredPull:
    dues: DueFetcher
    fetch: Any  # a wrapt wrapper function: _chained_fetch(...)


@dataclass
class _ClassPatches:
    """The wraps of nats-py's JetStream classes, while any installed client has a chain."""

    # False once taken out: a wrapper another library wrapped in turn stays, passing through.
    active: bool = True
    patches: list[tuple[type, str, Any]] = field(default_factory=list)


_class_patches: _ClassPatches | None = None

# Subscriptions made while natsmw was installed, with the chain in their callback from the
# start: they keep it after uninstall, and a later install does not chain them again.
_chained_subscriptions: weakref.WeakSet[Any] = weakref.WeakSet()
_chained_pulls: weakref.WeakSet[Any] = weakref.WeakSet()

_installed: weakref.WeakKeyDictionary[Client, _Installation] = weakref.WeakKeyDictionary()


def install(
    nc: Client,
    *,
    lazy_headers: bool = True,
    chain: Middleware | None = None,
    fetch_settle_timeout: Duration = FETCH_SETTLE_TIMEOUT,
) -> None:
    """Install natsmw on the client ``nc``.

    Args:
        nc: the nats-py client; connected or not, with subscriptions or not.
        lazy_headers: decode message headers on first access instead of in the read loop.
            Applies at once to every subscription of the client, existing ones included.
        chain: a middleware (for example ``compose(...)``) put in front of the callback of
            every subscription of ``nc``: ``nc.subscribe(cb=...)`` and ``js.subscribe(cb=...)``
            (push, auto-ack or not); and around every message that ``fetch`` returns, on
            every pull subscription of ``nc``. Whenever they were made: JetStream contexts
            made before install (frameworks such as FastStream make theirs at connect time)
            are covered as those made after, and so are subscriptions that exist already (see
            below).

    Subscriptions made before install: a callback subscription (core or JetStream push) gets
    the chain in front of its callback in place, from its next message on, and a JetStream push
    subscription's parked messages are served to it, as for one made after install; a pull
    subscription gets the chain at its first ``fetch`` while installed. A subscription read
    without a callback (``next_msg()``, ``async for msg in sub.messages``) cannot be chained,
    made before install or after: install says so, as a warning naming its subject (give it
    ``cb=``, or run ``compose(...)(handler)`` on what it reads).

    A fetched message goes through the chain as if its handler were "the code that got it
    from ``fetch``": ``fetch`` returns the messages the chain lets through (a delay cap
    holds some, a size guard rejects some), as proxies, and the chain around each one ends
    when the caller settles it, or after ``fetch_settle_timeout`` (seconds or ``timedelta``;
    300 s by default), so settlement interceptors such as the delay cap's see the caller's
    ``nak``. Until then natsmw keeps the message (a task, its proxy, its body). On a consumer
    with ``ack_policy=none`` there is nothing to settle, and nothing is kept: the chain ends
    when ``fetch`` returns. ``fetch_settle_timeout=0`` does that everywhere (a delay cap then
    does not see naks made after ``fetch`` returned).

    Before deferring decoding, ``install`` checks that this nats-py's internals are what lazy
    decoding relies on, and pushes a test header block through the installed hook as
    nats-py's read loop would. If either fails (a nats-py outside `SUPPORTED_NATS_PY`
    that changed them), it takes the hook out again, leaves nats-py's own eager decoding as
    it is, and logs one warning (``natsmw.install``) naming the nats-py version and what
    failed; the chain, if any, is installed all the same.

    Raises:
        NatsmwError: natsmw is already installed on ``nc`` (``uninstall`` it first).
        TypeError: ``nc`` is not a nats-py client, ``chain`` is not callable, or
            ``fetch_settle_timeout`` is not a duration.
        ValueError: ``fetch_settle_timeout`` is negative, NaN or infinite.
    """
    if not isinstance(nc, Client):
        raise TypeError(
            f"install() takes a nats-py client (nats.connect() returns one), got {nc!r}"
        )
    if nc in _installed:
        raise NatsmwError(f"natsmw is already installed on {nc!r}; call uninstall(nc) first")
    if chain is not None:
        require_middleware(chain, "install(chain=...)")

        async def probe(msg: Msg) -> None: ...

        # Applied once now, to a handler of no consequence: a chain that returns no handler
        # would otherwise leave every subscription without a callback.
        require_handler(chain(probe), chain, "install(chain=...)")
    settle_timeout = to_seconds(fetch_settle_timeout, "fetch_settle_timeout")
    installation = _Installation(
        lazy_headers=lazy_headers,
        chain=chain,
        had_msg_class="msg_class" in vars(nc),
        msg_class=vars(nc).get("msg_class"),
        settle_timeout=settle_timeout,
    )
    if lazy_headers:
        _install_lazy_headers(nc, installation)
    coverage = _existing_coverage(nc, chain) if chain is not None else []
    if chain is not None:
        _wrap(nc, installation, "subscribe", _while(installation, _chained_subscribe(chain)))
        _wrap(nc, installation, "drain", _while(installation, _draining))
        _patch_classes()
    _installed[nc] = installation
    if chain is not None:
        # A client dropped without uninstall takes its installation with it, and with the
        # last one that has a chain, nats-py's classes are as they were.
        weakref.finalize(nc, _client_gone, installation)
        _cover_subscriptions(nc, installation, coverage)


def _install_lazy_headers(nc: Client, installation: _Installation) -> None:
    """Defer header decoding on ``nc`` where this nats-py lets natsmw do it without losing a
    message; else leave nats-py's eager decoding untouched, and warn once."""
    failure = unusable_parser(nc)
    if failure is None:
        nc.msg_class = lazy_message_class(nc.msg_class)
        _wrap(nc, installation, "_process_headers", _deferring(installation))
        failure = _probe_lazy_headers(nc)
        if failure is not None:
            _unwrap(nc, "_process_headers", *installation.wrappers.pop("_process_headers"))
            _restore_message_class(nc, installation)
    if failure is None:
        return
    installation.lazy_headers = False
    log.warning(
        "lazy headers are off on %r: with nats-py %s, %s. nats-py decodes headers itself, as "
        "without natsmw; natsmw supports nats-py%s",
        nc,
        _nats_py_version(),
        failure,
        SUPPORTED_NATS_PY,
    )


def _probe_lazy_headers(nc: Client) -> str | None:
    """What goes wrong when nats-py's read loop (``Client._process_msg``) meets the installed
    hook, or ``None``: await the hook on a raw block, build the message from its result, ask
    whether it is a control message, then read ``msg.headers`` as a handler would."""
    try:
        hdr = finish_now(nc._process_headers(_PROBE_BLOCK))
        msg = nc._build_message(0, b"natsmw.probe", b"", b"", hdr)
        if not hdr or nc._is_control_message(b"", hdr) is not None:
            return f"the installed header hook made {hdr!r} of {_PROBE_BLOCK!r}"
        if type(msg.headers) is not dict or msg.headers != _PROBE_HEADERS:
            return f"a message with headers {_PROBE_BLOCK!r} read as {msg.headers!r}"
        status = finish_now(nc._process_headers(_PROBE_STATUS_BLOCK))
        if type(status) is not dict or status.get("Status") != "404":
            return f"the installed header hook made {status!r} of {_PROBE_STATUS_BLOCK!r}"
    except Exception as error:  # whatever fails here would fail on every message
        return f"a test header block failed through the installed hook: {error!r}"
    return None


def _nats_py_version() -> str:
    try:
        return importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _wrap(nc: Client, installation: _Installation, name: str, wrapper: Any) -> None:
    had_own = name in vars(nc)
    ours = wrapt.FunctionWrapper(getattr(nc, name), wrapper)
    setattr(nc, name, ours)
    installation.wrappers[name] = (weakref.ref(ours), had_own)


def _while(installation: _Installation | _ClassPatches, wrapper: Any) -> Any:
    """``wrapper`` while ``installation`` is active; a plain pass-through after."""

    def guarded(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not installation.active:
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    return guarded


def uninstall(nc: Client) -> None:
    """Undo [`install`][install] on ``nc``; does nothing if natsmw is not installed there.

    New messages get nats-py's eager header decoding again; messages already received keep
    decoding on access, correctly. New subscriptions get the callback exactly as given.
    Subscriptions the chain reached, made while installed or before, keep it around their
    callback (and their pull's ``fetch``), and their parked messages served, until they are
    unsubscribed: a chain in the middle of a delay hold must not be dropped silently, or the
    handler would run before the deadline. A later install does not chain them again. With
    the last installation that has a chain, nats-py's JetStream classes are as they were.
    """
    installation = _installed.pop(nc, None)
    if installation is None:
        return
    installation.active = False
    for name, (ours, had_own) in installation.wrappers.items():
        _unwrap(nc, name, ours, had_own)
    if installation.lazy_headers:
        _restore_message_class(nc, installation)
    # Subscriptions made before install keep the chain too, as those made while installed:
    # one in the middle of a delay hold would otherwise run its handler before the deadline.
    for sub in list(installation.covered):
        _chained_subscriptions.add(sub)
    installation.covered.clear()
    for psub, pull in list(installation.pulls.items()):
        _keep_chained_pull(psub, pull)
    installation.pulls.clear()
    if not any(other.active and other.chain is not None for other in _installed.values()):
        _unpatch_classes()


def _unwrap(nc: Client, name: str, mine: weakref.ref[Any], had_own: bool) -> None:
    """Take our wrapper of ``nc.<name>`` out, unless someone wrapped it since (then it
    stays, and passes calls straight through once the installation is inactive)."""
    ours = mine()
    if ours is None:
        return  # replaced meanwhile, and gone
    before = ours.__wrapped__  # what was there before install
    instance = vars(nc)
    if instance.get(name) is not ours:
        return
    if had_own:
        instance[name] = before
    else:
        del instance[name]


def _restore_message_class(nc: Client, installation: _Installation) -> None:
    if installation.had_msg_class:
        nc.msg_class = installation.msg_class
    else:
        vars(nc).pop("msg_class", None)


@contextmanager
def installed(
    nc: Client,
    *,
    lazy_headers: bool = True,
    chain: Middleware | None = None,
    fetch_settle_timeout: Duration = FETCH_SETTLE_TIMEOUT,
) -> Iterator[Client]:
    """``with installed(nc, ...):`` installs natsmw on ``nc`` for the block, then uninstalls."""
    install(nc, lazy_headers=lazy_headers, chain=chain, fetch_settle_timeout=fetch_settle_timeout)
    try:
        yield nc
    finally:
        uninstall(nc)


def _deferring(installation: _Installation) -> Any:
    async def defer_decoding(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raw = args[0] if args else kwargs.get("headers")
        if not raw:
            return None  # what nats-py returns for a message without headers, without the call
        if installation.active and can_defer(raw):
            return Undecoded(wrapped, raw)  # wrapped: nats-py's parser, bound to the client
        return await wrapped(*args, **kwargs)

    return defer_decoding


def _chained_subscribe(chain: Middleware) -> Any:
    async def subscribe(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        nc = wrapped.__self__
        arguments = list(args)
        callback = arguments[2] if len(arguments) >= 3 else kwargs.get("cb")
        chained = _chained(chain, nc, callback)
        if len(arguments) >= 3:
            arguments[2] = chained
        elif callback is not None:
            kwargs = {**kwargs, "cb": chained}
        sub = await wrapped(*arguments, **kwargs)
        if chained is not callback:
            _chained_subscriptions.add(sub)
        elif callback is None:
            _warn_unchained(nc, sub)
        return sub

    return subscribe


def _chained(chain: Middleware, nc: Client, callback: Handler | None) -> Handler | None:
    """``chain(callback)``, or ``callback`` itself where it is nats-py's or natsmw's own, or
    synchronous: nats-py then refuses it, as it always did."""
    if callback is None or callback == nc._request_sub_callback:
        return callback
    if _sync(callback):
        return callback
    if getattr(callback, "__func__", None) is JetStreamContext._handle_async_reply:
        return callback  # nats-py's PubAck inbox for publish_async
    if getattr(callback, "__module__", "").startswith(_INTERNAL_MODULES):
        return callback
    return require_handler(chain(callback), chain, "install(chain=...)")


def _sync(callback: object) -> bool:
    """Whether ``callback`` is synchronous (a ``def``, a partial of one, an object with a
    plain ``__call__``): nats-py refuses it, and a chain around it could only fail on every
    message. An object with an ``async def __call__``, which nats-py refuses too, works in a
    chain, and gets one."""
    target = getattr(callback, "func", callback)  # a functools.partial: what it calls
    if inspect.iscoroutinefunction(target):
        return False
    call = getattr(type(target), "__call__", None)  # noqa: B004  (the method, to test it)
    return not (
        call is not None
        and not inspect.isfunction(target)
        and not inspect.ismethod(target)
        and inspect.iscoroutinefunction(call)
    )


def _warn_unchained(nc: Client, sub: Any) -> None:
    """Say that the messages of ``sub``, a subscription without a callback, never go through
    the chain; nats-py's own inboxes (a pull subscription's, a push one's) are not the user's
    to read, and say nothing."""
    inbox = bytes(nc._inbox_prefix).decode()
    if getattr(sub, "_jsi", None) is None and sub._subject.startswith(inbox):
        return
    log.warning(
        "natsmw's chain cannot run around the messages of the subscription to %r on %r: it "
        "has no callback (its messages are read with next_msg() or sub.messages, and reach "
        "the reader as they are). Subscribe with cb=..., or run the chain yourself: "
        "compose(...)(handler)(msg)",
        sub._subject,
        nc,
    )


def _existing_coverage(nc: Client, chain: Middleware) -> list[tuple[Any, Handler, Handler]]:
    """The subscriptions of ``nc`` made before install whose callback the chain can go in
    front of, each with its callback and the chained one. Changes nothing: a chain that
    refuses a callback (two delay caps) raises here, before install changes anything."""
    coverage: list[tuple[Any, Handler, Handler]] = []
    for sub in list(getattr(nc, "_subs", {}).values()):
        callback = sub._cb
        if sub in _chained_subscriptions or callback is None:
            continue  # a chain from an earlier install already; or no callback to chain
        chained = _chained(chain, nc, callback)
        if chained is not None and chained is not callback:
            coverage.append((sub, callback, chained))
    return coverage


def _cover_subscriptions(
    nc: Client, installation: _Installation, coverage: list[tuple[Any, Handler, Handler]]
) -> None:
    """Chain the callbacks of subscriptions made before install, in place (nats-py reads
    ``sub._cb`` for each message), and serve the parked messages of the JetStream ones."""
    for sub, _, chained in coverage:
        sub._cb = chained
        installation.covered.add(sub)
        _serve_existing(nc, installation, sub, chained)
    for sub in list(getattr(nc, "_subs", {}).values()):
        if sub._cb is None:
            _warn_unchained(nc, sub)


def _serve_existing(nc: Client, installation: _Installation, sub: Any, chained: Handler) -> None:
    jsi = getattr(sub, "_jsi", None)
    if jsi is None:
        return  # a core subscription: nothing of it is ever parked
    psub = jsi._psub
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        log.warning(
            "natsmw cannot serve the parked messages of %s/%s (a JetStream subscription made "
            "before install): install was called outside the event loop. Call it from a "
            "coroutine, or call serve_parked for that consumer",
            psub._stream,
            psub._consumer,
        )
        return
    subs = nc._subs
    ParkedServing(
        nc, chained, psub._stream, psub._consumer,
        manual_ack=True, retention=DEFAULT_RETENTION, concurrency=1,
        alive=lambda: sub._id in subs,  # until unsubscribed, uninstall or not
    )  # fmt: skip


def _installation_of(nc: Any) -> _Installation | None:
    try:
        return _installed.get(nc)
    except TypeError:  # not weakly referenceable: no client install() knows
        return None


def _patch_classes() -> None:
    """Wrap nats-py's JetStream classes, once: every context and pull subscription of an
    installed client is covered, whenever it was made."""
    global _class_patches
    if _class_patches is not None:
        return
    patches = _ClassPatches()
    pull = JetStreamContext.PullSubscription
    for owner, name, wrapper in (
        (JetStreamContext, "subscribe", _serving_subscribe),
        (JetStreamContext, "pull_subscribe_bind", _chained_pull_subscribe),
        (pull, "fetch", _covering_fetch),
        (pull, "unsubscribe", _uncovering_unsubscribe),
    ):
        ours: Any = wrapt.wrap_function_wrapper(owner, name, _while(patches, wrapper))
        patches.patches.append((owner, name, ours))
    _class_patches = patches


def _client_gone(installation: _Installation) -> None:
    installation.active = False
    if not any(other.active and other.chain is not None for other in _installed.values()):
        _unpatch_classes()


def _unpatch_classes() -> None:
    """Take the wraps of nats-py's classes out, unless someone wrapped one since (then it
    stays, and passes every call straight through)."""
    global _class_patches
    patches, _class_patches = _class_patches, None
    if patches is None:
        return
    patches.active = False
    for owner, name, ours in patches.patches:
        before = ours.__wrapped__  # nats-py's own function
        if vars(owner).get(name) is ours:
            setattr(owner, name, before)


async def _draining(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # As drain() lets each callback finish, due messages being handled finish (and are
    # settled) before the connection goes: else another instance would handle them again.
    await stop_serving(wrapped.__self__)
    return await wrapped(*args, **kwargs)


async def _serving_subscribe(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``JetStreamContext.subscribe``: for an installed client, a push subscription's parked
    messages go to its (chained) callback."""
    nc = instance._nc
    installation = _installation_of(nc)
    if installation is None or installation.chain is None:
        return await wrapped(*args, **kwargs)
    callback = args[2] if len(args) >= 3 else kwargs.get("cb")
    # A chain that cannot wrap this callback (two delay caps) is refused before nats-py
    # creates the consumer on the server, not after.
    if callback is not None and _chained(installation.chain, nc, callback) is callback:
        return await wrapped(*args, **kwargs)  # nats-py's own: a key-value watcher
    sub = await wrapped(*args, **kwargs)
    if not isinstance(sub, JetStreamContext.PushSubscription):
        return sub
    if sub._cb is None:
        subject = args[0] if args else kwargs.get("subject", "")
        if not str(subject).startswith(("$O.", "$KV.")):  # nats-py's object store reads
            _warn_unchained(nc, sub._sub)
        return sub
    # Due messages of this consumer go to the same (chained) callback. It is the one
    # nats-py subscribed with: with manual_ack=False it acks them itself.
    subs = nc._subs
    serving = ParkedServing(
        nc, sub._cb, sub._stream, sub._consumer,
        manual_ack=True, retention=DEFAULT_RETENTION, concurrency=1,
        alive=lambda: sub._id in subs,
    )  # fmt: skip
    if await park_stream(nc).exists():
        # Messages parked before are served from now on, and the first long delay of this
        # subscription parks (it is held while the pull is not ready).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(serving.ready.wait(), 2.0)
    return sub


async def _chained_pull_subscribe(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``JetStreamContext.pull_subscribe_bind`` (``pull_subscribe`` calls it): a pull
    subscription made while installed keeps the chain around its ``fetch`` until it is
    unsubscribed, uninstall or not."""
    psub = await wrapped(*args, **kwargs)
    nc = instance._nc
    # The chain installed now, not when the context was made: it may have changed since.
    installation = _installation_of(nc)
    if installation is None or installation.chain is None or psub in _chained_pulls:
        return psub
    dues = DueFetcher(nc, psub._stream, psub._consumer)
    weakref.finalize(psub, dues.close)
    wait = await _settle_wait(psub, installation)
    psub.fetch = wrapt.FunctionWrapper(psub.fetch, _chained_fetch(installation.chain, dues, wait))
    psub.unsubscribe = wrapt.FunctionWrapper(psub.unsubscribe, _closing(dues))
    _chained_pulls.add(psub)
    return psub


async def _covering_fetch(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``PullSubscription.fetch``: a pull subscription made before install gets the chain of
    its client's installation, from its first fetch while installed."""
    installation = None if instance in _chained_pulls else _installation_of(instance._nc)
    if installation is None or installation.chain is None:
        return await wrapped(*args, **kwargs)  # its own chain from pull_subscribe, or none
    covered = installation.pulls.get(instance)
    if covered is None:
        covered = await _cover_pull(instance, installation, installation.chain)
    if covered is None:
        return await wrapped(*args, **kwargs)  # uninstalled meanwhile
    return await covered.fetch(wrapped, instance, args, kwargs)


async def _cover_pull(
    psub: Any, installation: _Installation, chain: Middleware
) -> _CoveredPull | None:
    wait = await _settle_wait(psub, installation)
    if not installation.active:
        return None
    covered = installation.pulls.get(psub)  # by a fetch that ran meanwhile
    if covered is None:
        dues = DueFetcher(psub._nc, psub._stream, psub._consumer)
        weakref.finalize(psub, dues.close)
        covered = installation.pulls[psub] = _CoveredPull(dues, _chained_fetch(chain, dues, wait))
    return covered


def _keep_chained_pull(psub: Any, pull: _CoveredPull) -> None:
    """Keep the chain around ``fetch`` of a pull subscription made before install, as one
    made while installed keeps it: on the subscription itself, over nats-py's own methods."""
    owner = JetStreamContext.PullSubscription
    psub.fetch = wrapt.FunctionWrapper(
        types.MethodType(_nats_py_own(owner, "fetch"), psub), pull.fetch
    )
    psub.unsubscribe = wrapt.FunctionWrapper(
        types.MethodType(_nats_py_own(owner, "unsubscribe"), psub), _closing(pull.dues)
    )
    _chained_pulls.add(psub)


def _nats_py_own(owner: type, name: str) -> Any:
    """nats-py's own function ``owner.<name>``, under natsmw's class patch if there is one."""
    for patched_owner, patched_name, ours in _class_patches.patches if _class_patches else ():
        if (patched_owner, patched_name) == (owner, name):
            return ours.__wrapped__
    return vars(owner)[name]


async def _uncovering_unsubscribe(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    installation = _installation_of(instance._nc)
    covered = installation.pulls.pop(instance, None) if installation is not None else None
    if covered is not None:
        await covered.dues.aclose()  # natsmw's own pull of due messages goes with it
    return await wrapped(*args, **kwargs)


_closing_dues: set[asyncio.Task[None]] = set()


def _close_soon(dues: DueFetcher) -> None:
    """Stop ``dues`` now, and unsubscribe natsmw's pull of them as soon as the loop can."""
    dues.close()
    try:
        task = asyncio.get_running_loop().create_task(dues.aclose())
    except RuntimeError:
        return  # no loop: the pull's subscription goes with its client
    _closing_dues.add(task)
    task.add_done_callback(_closing_dues.discard)


def _closing(dues: DueFetcher) -> Any:
    async def unsubscribe(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        await dues.aclose()  # natsmw's own pull of due messages goes with the subscription
        return await wrapped(*args, **kwargs)

    return unsubscribe


async def _settle_wait(psub: Any, installation: _Installation | None) -> float:
    """How long the chain around a fetched message waits for it to be settled: not at all
    where there is nothing to settle (a consumer with ``ack_policy=none``)."""
    wait = installation.settle_timeout if installation is not None else FETCH_SETTLE_TIMEOUT
    if wait <= 0:
        return 0.0
    try:
        # Through the subscription's own context: its domain or API prefix.
        info = await psub._js.consumer_info(psub._stream, psub._consumer, timeout=2.0)
    except (nats.errors.Error, asyncio.TimeoutError, OSError):
        return wait  # cannot tell: wait, as for a consumer that acks
    return 0.0 if info.config.ack_policy == AckPolicy.NONE else wait


_FETCH_FLOOR = 0.005  # seconds: a fetch again with less time left than this times out


def _chained_fetch(chain: Middleware, dues: DueFetcher, wait: float) -> Any:
    async def fetch(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[MessageProxy]:
        batch = args[0] if args else kwargs.pop("batch", 1)
        timeout = args[1] if len(args) > 1 else kwargs.pop("timeout", 5)
        rest = args[2:]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        again = False
        while True:
            due = await dues.take(batch)
            if due:
                released = await _through_chain(chain, list(due), wait)
                if released:
                    return released
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left < _FETCH_FLOOR:
                if again:
                    raise nats.errors.TimeoutError  # what nats-py raises: callers catch that
                left = _FETCH_FLOOR
            try:
                fetched = await wrapped(batch, left, *rest, **kwargs)
            except asyncio.TimeoutError as error:
                if isinstance(error, nats.errors.TimeoutError):
                    raise
                # nats-py raises a bare one where a fetch's time is all but gone.
                raise nats.errors.TimeoutError from error
            released = await _through_chain(chain, fetched, wait)
            if released:
                return released
            # Everything fetched was held or rejected: fetch again within the caller's
            # timeout, and time out as nats-py would, rather than return an empty batch.
            if deadline is not None and loop.time() >= deadline:
                raise nats.errors.TimeoutError
            again = True

    return fetch


_running: set[asyncio.Task[None]] = set()


async def _through_chain(chain: Middleware, msgs: list[Msg], wait: float) -> list[MessageProxy]:
    """Run each fetched message through ``chain``; return those that reached its end. The
    chain around each waits up to ``wait`` seconds for the caller to settle it.

    A message whose chain fails before reaching its end is logged and not returned; being
    unsettled, it comes back after the consumer's ack_wait. The others are returned.
    """
    released: list[MessageProxy | None] = [None] * len(msgs)
    decided = [asyncio.Event() for _ in msgs]

    async def run(index: int, msg: Msg) -> None:
        async def release(proxy: Msg) -> None:
            reached = released[index] = MessageProxy.of(proxy)
            decided[index].set()
            if wait > 0 and not await reached.wait_settled(wait):
                log.warning(
                    "%s was not settled within %.1fs of fetch returning it: the natsmw chain "
                    "around it ends now, and a later nak or ack reaches the server unchanged",
                    reached.subject, wait,
                )  # fmt: skip

        setattr(release, RUNS_ELSEWHERE, True)
        try:
            await chain(release)(msg)
        finally:
            decided[index].set()

    tasks = [asyncio.create_task(run(index, msg)) for index, msg in enumerate(msgs)]
    _running.update(tasks)
    for task in tasks:
        task.add_done_callback(_finished)
    await asyncio.gather(*(event.wait() for event in decided))
    return [proxy for proxy in released if proxy is not None]


def _finished(task: asyncio.Task[None]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("natsmw chain around a fetched message failed", exc_info=task.exception())
