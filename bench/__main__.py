"""Run every benchmark: ``python -m bench`` (about fifty minutes), or
``python -m bench --quick`` (a minute: small sizes, to check that they still run; the figures
mean little).

Each benchmark prints its table and writes bench/results/<name>.json; BENCHMARKS.md records
the figures of a full run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

FULL = {
    "micro": [],
    "consume": [],
    "tracing": [],
    "holds": [],
    "soak": ["--cap", "30"],
    "park": [],
    "churn": [],
    "deferred": [],
    "claim": [],
}
QUICK = {
    "micro": ["--messages", "200", "--rounds", "1"],
    "consume": ["--messages", "500", "--rounds", "1", "--headers", "0", "20"],
    "tracing": ["--messages", "500", "--rounds", "1"],
    "holds": ["--messages", "200", "--seconds", "1", "--rounds", "1"],
    "soak": ["--messages", "1000", "--cycles", "2", "--cap", "1"],
    "park": ["--messages", "200", "--delay", "3", "--cap", "1"],
    "churn": ["--clients", "10", "--consumers", "2"],
    "deferred": ["--messages", "200", "--rounds", "1"],
    "claim": ["--messages", "3", "--size", "2000000", "--rounds", "1"],
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check they run")
    parser.add_argument("only", nargs="*", help=f"run only these, of {', '.join(FULL)}")
    args = parser.parse_args()
    unknown = set(args.only) - set(FULL)
    if unknown:
        parser.error(
            f"no benchmark named {', '.join(sorted(unknown))}; there are {', '.join(FULL)}"
        )
    plan = QUICK if args.quick else FULL
    for name, options in plan.items():
        if args.only and name not in args.only:
            continue
        print(f"== bench.{name} {' '.join(options)}", flush=True)
        status = subprocess.call([sys.executable, "-m", f"bench.{name}", *options])
        if status != 0:
            print(f"bench.{name} failed with exit status {status}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
