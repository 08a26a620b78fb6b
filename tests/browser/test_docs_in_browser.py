"""The documentation site renders in a real browser: Debian's headless Chromium.

Not part of the suite the README's command 2 runs (PyPI has no Chromium): ``.ci/run``
installs Chromium, then runs this directory. ``site`` (conftest.py) is tests/test_docs.py's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _render(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after Chromium has loaded it and run its scripts."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "no chromium on PATH: the browser test needs Debian's Chromium, "
            "apt-get install --no-install-recommends -y chromium (.ci/run installs it)"
        )
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"chromium failed on {page}:\n{result.stderr[-2000:]}"
    return result.stdout


def test_quickstart_and_api_pages_render_in_chromium(site: Path, tmp_path: Path) -> None:
    quickstart = _render(site / "quickstart.html", tmp_path / "profile")
    assert "<title>Quickstart - natsmw</title>" in quickstart
    assert 'class="no-js"' not in quickstart  # the theme's scripts ran and marked the page
    assert "serve_parked" in quickstart

    reference = _render(site / "reference" / "natsmw.html", tmp_path / "profile")
    assert 'class="no-js"' not in reference
    assert 'id="natsmw.with_delay_cap"' in reference
    assert 'id="natsmw.install"' in reference
