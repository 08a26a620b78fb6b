"""The natsmw command line: ``python -m natsmw demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="natsmw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the demo against an embedded nats-server")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from natsmw._demo import run_demo

        return asyncio.run(run_demo())
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
