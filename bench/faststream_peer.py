"""FastStream as a peer: natsmw and FastStream against raw nats-py, on one embedded server, one run.

    python -m bench.faststream_peer [--messages N] [--rounds R] [--venv DIR]

FastStream's dependencies must never enter natsmw's own environment, so this script makes a
virtual environment of its own (or reuses it), installs bench/faststream-requirements.txt
(FastStream, pinned) and natsmw from this checkout (editable, with the ``demo`` extra) into it,
and runs ``bench.faststream_worker`` there, which measures and writes
bench/results/faststream.json. The environment lives in
``$XDG_CACHE_HOME/natsmw-bench/faststream`` (``~/.cache/natsmw-bench/faststream`` when
``XDG_CACHE_HOME`` is unset), outside the repository; ``--venv`` puts it elsewhere. The first
run installs (about a quarter of a minute from a nearby index); later runs reuse it until
bench/faststream-requirements.txt or pyproject.toml changes. Delete the directory to start
afresh.

What is measured, and how: see bench/faststream_worker.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "bench" / "faststream-requirements.txt"
INSTALLED = "natsmw-bench-installed.txt"  # in the venv: what it was installed from


def default_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "natsmw-bench" / "faststream"


def pinned() -> str:
    """The requirements of the FastStream side, as one line for messages."""
    lines = REQUIREMENTS.read_text().splitlines()
    return " ".join(line for line in lines if line.strip() and not line.startswith("#"))


def installed_from() -> str:
    """What an up-to-date venv was installed from: a change to any of it reinstalls."""
    pyproject = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    return f"{REQUIREMENTS.read_text()}\npyproject.toml {pyproject}\nnatsmw {REPO}\n"


def ready_python(venv: Path) -> Path:
    """The venv's interpreter, after making the venv and installing into it if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making a virtual environment for FastStream in {venv}", flush=True)
        made = subprocess.call([sys.executable, "-m", "venv", str(venv)])
        if made != 0:
            raise SystemExit(
                f"bench.faststream_peer: could not make a virtual environment in {venv} "
                f"({sys.executable} -m venv exited with {made}); on Debian-like systems "
                "install python3-venv, or pass --venv with a writable directory"
            )
    marker = venv / INSTALLED
    wanted = installed_from()
    if marker.exists() and marker.read_text() == wanted:
        return python
    print(f"installing {pinned()} and natsmw (editable) into {venv}", flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    status = subprocess.call([*pip, "-r", str(REQUIREMENTS)])
    if status != 0:
        raise SystemExit(
            f"bench.faststream_peer: could not install {pinned()} into {venv} (pip exited "
            f"with {status}; its errors are above). Check that the package index pip uses "
            "has that release (pip index versions faststream); to measure another release, "
            f"change the pin in {REQUIREMENTS.relative_to(REPO)}"
        )
    status = subprocess.call([*pip, "-e", f"{REPO}[demo]"])
    if status != 0:
        raise SystemExit(
            f"bench.faststream_peer: could not install natsmw from {REPO} into {venv} (pip "
            f"exited with {status}; its errors are above); natsmw's own install "
            "(pip install -e '.[dev]') needs the same packages"
        )
    marker.write_text(wanted)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faststream_peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after a warm-up")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faststream.json"))
    parser.add_argument("--venv", type=Path, default=default_venv(), help="default: %(default)s")
    args = parser.parse_args()
    if args.messages < 1 or args.rounds < 1:
        parser.error(f"--messages {args.messages} --rounds {args.rounds}: both must be 1 or more")
    python = ready_python(args.venv.expanduser().resolve())
    worker = [str(python), "-m", "bench.faststream_worker"]
    options = ["--messages", str(args.messages), "--rounds", str(args.rounds)]
    return subprocess.call([*worker, *options, "--out", str(args.out.resolve())], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
