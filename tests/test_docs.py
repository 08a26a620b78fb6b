"""The documentation site builds in strict mode, and documents every public name.

The build runs ``mkdocs build --strict`` (mkdocs.yml at the top of the repository): a broken
link, a missing anchor or an API reference that names nothing fails it. Opening the pages in a
real browser needs Debian's Chromium, which PyPI does not have: that test is in
tests/browser/, which ``.ci/run`` runs after installing Chromium.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import natsmw
import natsmw.delay

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module with ``mkdocs build --strict``."""
    assert MKDOCS.is_file(), f"no {MKDOCS}: install the docs extra, pip install -e '.[dev]'"
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def test_docs_build_strict_with_quickstart_and_guides(site: Path) -> None:
    quickstart = (site / "quickstart.html").read_text()
    for name in ("with_delay_cap", "serve_parked", "handler_calls", "NatsServer"):
        assert name in quickstart
    for page in ("delay", "delay-park", "delay-hold", "headers", "guards", "tracing", "install"):
        assert (site / "guides" / f"{page}.html").is_file()
    assert "Keep a Changelog" in (site / "changelog.html").read_text()


def test_api_reference_documents_every_public_name(site: Path) -> None:
    reference = (site / "reference" / "natsmw.html").read_text()
    missing = [name for name in natsmw.__all__ if f'id="natsmw.{name}"' not in reference]
    assert not missing, f"natsmw names without an entry in the API reference: {missing}"

    delay = (site / "reference" / "delay.html").read_text()
    delay_only = [name for name in natsmw.delay.__all__ if name not in natsmw.__all__]
    missing = [name for name in delay_only if f'id="natsmw.delay.{name}"' not in delay]
    assert not missing, f"natsmw.delay names without an entry in the API reference: {missing}"

    assert 'id="natsmw.server.NatsServer"' in (site / "reference" / "server.html").read_text()
    instrumentation = (site / "reference" / "instrumentation.html").read_text()
    assert 'id="natsmw.instrumentation.NatsmwInstrumentor"' in instrumentation


def test_cross_references_in_docstrings_render_as_links(site: Path) -> None:
    pages = {page.name: page.read_text() for page in (site / "reference").glob("*.html")}
    roles = [name for name, html in pages.items() if re.search(r":(class|meth|func|mod):`", html)]
    assert not roles, f"reStructuredText roles shown as text in {roles}"
    # A method's docstring names its class's other methods by their short names.
    assert 'href="#natsmw.server.NatsServer.start"><code>start</code>' in pages["server.html"]


def test_the_quickstart_program_runs_as_printed(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "quickstart.md").read_text(), re.S)
    program = tmp_path / "quickstart.py"
    program.write_text(next(block for block in blocks if "asyncio.run(main())" in block))
    result = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "reminder for alice, call 2" in result.stdout
    assert "parked=1, unparked=1" in result.stdout
