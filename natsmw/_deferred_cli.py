"""natsmw deferred: list, show, release and cancel deferred messages (wraps natsmw.ops).

Exit status: 0 done; 1 the server refused or could not be read; 2 a usage error (including a
cancel not confirmed); 3 what was named does not exist (stream, consumer, deferred message,
or any natsmw data on the server). --json prints JSON Lines: one object per message
("type": "message"), then one per consumer ("type": "consumer").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TextIO

import nats
from nats.aio.client import Client

from natsmw import ops

OK, FAILED, USAGE, NOT_FOUND = 0, 1, 2, 3


def add_parser(commands: Any) -> None:
    """Add ``deferred`` and its subcommands to the ``natsmw`` command line."""
    deferred = commands.add_parser(
        "deferred",
        help="list, show, release or cancel deferred messages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection (as the nats CLI)")
    group.add_argument(
        "-s", "--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS server URL(s), comma-separated (default: $NATS_URL, else %(default)s)",
    )  # fmt: skip
    group.add_argument("--creds", help="user credentials file")
    group.add_argument("--user", help="user name, or token")
    group.add_argument("--password", help="password")
    group.add_argument("--tlscert", help="client certificate (TLS)")
    group.add_argument("--tlskey", help="client private key (TLS)")
    group.add_argument("--tlsca", help="CA certificate to verify the server with (TLS)")
    group.add_argument("--timeout", type=float, default=5.0, help="connect timeout, seconds")
    actions = deferred.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", parents=[connection], help="every deferred message")
    _filters(listing)
    listing.add_argument("--overdue", action="store_true", help="only those past their deadline")
    listing.add_argument("--json", action="store_true", help="JSON Lines, for scripts")

    for name, text in (
        ("show", "one deferred message, in full"),
        ("release", "make it due now (a parked one fires now, a held one runs next delivery)"),
        ("cancel", "make sure it never runs (deleted if parked, terminated if held)"),
    ):
        action = actions.add_parser(name, parents=[connection], help=text, description=text)
        if name == "show":
            _message(action, required=True)
        else:
            _message(action, required=False)
            action.add_argument(
                "--all", action="store_true", help="every deferred message the filters select"
            )
            _filters(action, prefix="filter ")
            action.add_argument("--yes", action="store_true", help="do not ask to confirm")
        action.add_argument("--json", action="store_true", help="JSON, for scripts")


def _filters(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--stream", help=f"{prefix}by stream")
    parser.add_argument("--consumer", help=f"{prefix}by durable consumer (with --stream)")


def _message(parser: argparse.ArgumentParser, *, required: bool) -> None:
    nargs = None if required else "?"
    parser.add_argument("message_stream", metavar="STREAM", nargs=nargs)
    parser.add_argument("message_consumer", metavar="CONSUMER", nargs=nargs)
    parser.add_argument("sequence", metavar="SEQ", type=int, nargs=nargs)


async def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one ``natsmw deferred`` action; return the exit status."""
    if args.action in ("release", "cancel"):
        named = args.message_stream is not None
        if named and args.all:
            print(f"natsmw deferred {args.action}: give STREAM CONSUMER SEQ or --all, not both",
                  file=err)  # fmt: skip
            return USAGE
        if (not named and not args.all) or (named and args.sequence is None):
            print(f"natsmw deferred {args.action}: give STREAM CONSUMER SEQ, or --all "
                  f"(with --stream/--consumer to narrow it)", file=err)  # fmt: skip
            return USAGE
    if getattr(args, "consumer", None) and not getattr(args, "stream", None):
        print("natsmw deferred: --consumer needs --stream (a consumer is named in its stream)",
              file=err)  # fmt: skip
        return USAGE
    denied: list[str] = []
    refused = asyncio.Event()
    try:
        nc = await _connect(args, denied, refused)
    except ModuleNotFoundError as error:
        print(f"natsmw deferred: --creds needs {error.name!r}: pip install 'nats-py[nkeys]'",
              file=err)  # fmt: skip
        return FAILED
    except Exception as error:  # whatever nats-py raises: say it and stop
        print(f"natsmw deferred: cannot connect to {args.server}: {error!r}", file=err)
        return FAILED
    try:
        if args.action == "list":
            return await _unless_refused(_list(nc, args, out), refused)
        if args.action == "show":
            return await _unless_refused(_show(nc, args, out), refused)
        # A change may be half made when a request of it is refused: it runs to its own end
        # and says what was done.
        return await _change(nc, args, out, err)
    except ops.NotFound as error:
        print(f"natsmw deferred: {error}", file=err)
        return NOT_FOUND
    except ops.OpsError as error:
        if denied:  # the server said why the request went unanswered
            print(f"natsmw deferred: no permission: {denied[-1]} ({error})", file=err)
        else:
            print(f"natsmw deferred: {error}", file=err)
        return FAILED
    finally:
        await nc.close()


async def _unless_refused(reading: Coroutine[Any, Any, int], refused: asyncio.Event) -> int:
    """What ``reading`` returns, or as soon as the server refuses one of its requests,
    ``ops.OpsError``: a refused request is never answered, and would otherwise wait out its
    timeout. For commands that only read: nothing is left half done.

    Raises:
        ops.OpsError: the server refused a request (its words are in the error callback's).
    """
    task = asyncio.ensure_future(reading)
    waiter = asyncio.ensure_future(refused.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled from outside (Ctrl-C): the reading goes too
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task in done:
        return task.result()  # done before any refusal, or at the same moment: its own end
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ops.OpsError):
        await task  # whatever it says once cancelled, the refusal is why it stopped
    raise ops.OpsError("the server refused a request")


async def _connect(args: argparse.Namespace, denied: list[str], refused: asyncio.Event) -> Client:
    options: dict[str, Any] = {
        "servers": args.server.split(","),
        "connect_timeout": args.timeout,
        "allow_reconnect": False,
    }
    if args.creds:
        options["user_credentials"] = args.creds
    if args.user and args.password is None:
        options["token"] = args.user
    elif args.user:
        options["user"], options["password"] = args.user, args.password
    if args.tlscert or args.tlsca:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tlsca)
        if args.tlscert:
            context.load_cert_chain(args.tlscert, args.tlskey)
        options["tls"] = context

    async def quiet(error: Exception) -> None:
        # Reported by the command itself; a permission violation says why a request of its
        # went unanswered.
        if "permissions violation" in str(error).lower():
            denied.append(str(error))
            refused.set()

    # nats-py may keep trying a server that refuses: the timeout is the operator's.
    return await asyncio.wait_for(nats.connect(error_cb=quiet, **options), args.timeout + 1)


async def _list(nc: Client, args: argparse.Namespace, out: TextIO) -> int:
    now = time.time()
    messages = ops.deferred(nc, stream=args.stream, consumer=args.consumer)
    if args.overdue:
        messages = _overdue(messages, now)
    summaries: dict[tuple[str, str], ops.ConsumerSummary] = {}
    shown = 0
    async for message in messages:
        group = (message.stream, message.consumer)
        if group not in summaries:
            summaries[group] = ops.ConsumerSummary(*group)
        summaries[group].add(message, now)
        if args.json:
            out.write(json.dumps({"type": "message", **message.as_json(now)}) + "\n")
        else:
            if shown == 0:
                out.write(_HEADER + "\n")
            out.write(_line(message, now, _terminal_width(out)) + "\n")
        shown += 1
    for summary in summaries.values():
        if args.json:
            out.write(json.dumps({"type": "consumer", **summary.as_json(now)}) + "\n")
        else:
            out.write(_summary_line(summary, now) + "\n")
    if not args.json and shown == 0:
        out.write("no deferred messages" + (" overdue" if args.overdue else "") + "\n")
    return OK


async def _overdue(
    messages: AsyncIterator[ops.DeferredMessage], now: float
) -> AsyncIterator[ops.DeferredMessage]:
    async for message in messages:
        if message.deadline <= now:
            yield message


async def _show(nc: Client, args: argparse.Namespace, out: TextIO) -> int:
    shown = await ops.show(nc, args.message_stream, args.message_consumer, args.sequence)
    now = time.time()
    if args.json:
        document = {
            "message": shown.message.as_json(now),
            "headers": shown.headers,
            "body_size": shown.body_size,
            "record": shown.record,
        }
        out.write(json.dumps(document) + "\n")
        return OK
    message = shown.message
    rows = [
        ("message", f"{message.stream}/{message.consumer} seq {message.sequence}"),
        ("tier", _TIERS[message.tier]),
        ("deadline", f"{ops_utc(message.deadline)} ({_due(message.deadline - now)})"),
        ("subject", message.subject or "(not recorded)"),
        ("handler calls", str(message.handler_calls)),
        ("deliveries", "-" if message.deliveries is None else str(message.deliveries)),
        ("asked delay", "-" if message.requested is None else f"{message.requested:g}s"),
        ("deferred by", f"trace {message.trace_id}" if message.trace_id else "(not traced)"),
        ("body size", "(gone from its stream)" if shown.body_size is None
         else f"{shown.body_size} bytes"),
    ]  # fmt: skip
    for name, value in rows:
        out.write(f"{name:>14}: {value}\n")
    out.write(f"{'headers':>14}:" + ("" if shown.headers else " (none)") + "\n")
    for name, value in (shown.headers or {}).items():
        out.write(f"{'':>16}{name}: {value}\n")
    out.write(f"{'record':>14}: {json.dumps(shown.record)}\n")
    return OK


async def _change(nc: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    change = ops.release if args.action == "release" else ops.cancel
    if args.message_stream is not None:
        targets = [(args.message_stream, args.message_consumer, args.sequence)]
    else:
        targets = [
            (m.stream, m.consumer, m.sequence)
            async for m in ops.deferred(nc, stream=args.stream, consumer=args.consumer)
        ]
        if not targets:
            out.write("no deferred messages selected\n")
            return OK
    if (args.action == "cancel" or args.all) and not args.yes:
        if not sys.stdin.isatty():
            print(f"natsmw deferred {args.action}: not run from a terminal: confirm with --yes",
                  file=err)  # fmt: skip
            return USAGE
        for stream, consumer, sequence in targets[:10]:
            out.write(f"  {stream}/{consumer} seq {sequence}\n")
        if len(targets) > 10:
            out.write(f"  ... and {len(targets) - 10} more\n")
        effect = "They will never run." if args.action == "cancel" else "They run now."
        question = f"{args.action.capitalize()} these {len(targets)} message(s)? {effect} [y/N] "
        answer = await _answer(question, out)
        if answer.strip().lower() not in ("y", "yes"):
            print(f"nothing {args.action}d" if args.action == "release" else "nothing cancelled",
                  file=err)  # fmt: skip
            return USAGE
    failed = 0
    for stream, consumer, sequence in targets:
        try:
            before = await change(nc, stream, consumer, sequence)
        except ops.NotFound as error:
            if len(targets) == 1:
                raise
            failed += 1
            print(f"natsmw deferred: {error}", file=err)
            continue
        if args.json:
            out.write(json.dumps({"type": args.action, **before.as_json()}) + "\n")
        else:
            verb = "released" if args.action == "release" else "cancelled"
            if args.action == "release" and before.tier == "due":
                verb = "nothing to release: already due, waiting for its consumer:"
            out.write(f"{verb} {stream}/{consumer} seq {sequence} ({_TIERS[before.tier]})\n")
    return FAILED if failed else OK


_TIERS = {"held": "held", "parked": "parked", "due": "due, waiting for its consumer"}
_HEADER = f"{'TIER':<6} {'STREAM/CONSUMER':<24} {'SEQ':>8} {'DUE IN':>10} {'CALLS':>5} SUBJECT"


def _line(message: ops.DeferredMessage, now: float, width: int | None) -> str:
    # Names are never cut (an operator copies them into show or release); only the subject,
    # last, is cut to a terminal's width.
    where = f"{message.stream}/{message.consumer}"
    line = (
        f"{message.tier:<6} {where:<24} {message.sequence:>8} "
        f"{_due(message.deadline - now, short=True):>10} {message.handler_calls:>5} "
        f"{message.subject or '-'}"
    )
    if width is None or len(line) <= width:
        return line
    return _clip(line, max(width, len(line) - len(message.subject or "-") + 12))


def _summary_line(summary: ops.ConsumerSummary, now: float) -> str:
    counts = f"{summary.held} held, {summary.parked} parked, {summary.due} due"
    upcoming = (
        "" if summary.next_deadline is None else f"; next in {_span(summary.next_deadline - now)}"
    )
    stranded = (
        "" if summary.oldest_overdue is None else f"; overdue {_span(now - summary.oldest_overdue)}"
    )
    return f"{summary.stream}/{summary.consumer}: {counts}{upcoming}{stranded}"


def _due(seconds: float, *, short: bool = False) -> str:
    if seconds > 0:
        return _span(seconds) if short else f"due in {_span(seconds)}"
    return f"-{_span(-seconds)}" if short else f"overdue by {_span(-seconds)}"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _terminal_width(out: TextIO) -> int | None:
    """The terminal's width when ``out`` is one (lines are cut to it), else ``None``."""
    try:
        return shutil.get_terminal_size().columns if out.isatty() else None
    except (AttributeError, ValueError, OSError):
        return None


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def ops_utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


async def _answer(question: str, out: TextIO) -> str:
    """A line typed at the terminal, read without a thread: Ctrl-C cancels the wait (a thread
    blocked in input() would keep the process from exiting). Ctrl-D answers ''."""
    out.write(question)
    out.flush()
    loop = asyncio.get_running_loop()
    typed: asyncio.Future[None] = loop.create_future()
    descriptor = sys.stdin.fileno()

    def readable() -> None:
        if not typed.done():
            typed.set_result(None)

    loop.add_reader(descriptor, readable)
    try:
        await typed
    finally:
        loop.remove_reader(descriptor)
    return sys.stdin.readline()
