"""Take docs/images/deferred-trace.png: the trace of examples/tracing_backend.py in MLflow.

    apt-get install --no-install-recommends -y chromium   # Debian's, once
    pip install -e '.[backend]'
    python docs/images/screenshot_trace.py [--out PATH]

Runs the example with ``--keep-open`` (an MLflow of its own, one deferred message), opens the
URL it prints in headless Chromium, selects the run after the deadline (the span that links to
the run that deferred it), and saves the page as a PNG. Chromium is driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``), so nothing but the browser is needed.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tracing_backend.py"
WIDTH, HEIGHT = 1400, 560


class Chromium:
    """Headless Chromium, driven over the DevTools protocol on its pipe (fds 3 and 4)."""

    def __init__(self, profile: Path) -> None:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise SystemExit("no chromium: apt-get install --no-install-recommends -y chromium")
        self._replies, chrome_writes = os.pipe()
        chrome_reads, self._requests = os.pipe()

        def pipe_on_3_and_4() -> None:  # in the child: fds 3 (it reads) and 4 (it writes)
            reads = fcntl.fcntl(chrome_reads, fcntl.F_DUPFD, 10)
            writes = fcntl.fcntl(chrome_writes, fcntl.F_DUPFD, 10)
            os.dup2(reads, 3)
            os.dup2(writes, 4)

        command = [browser, "--headless", "--disable-gpu", "--remote-debugging-pipe"]
        command += [f"--user-data-dir={profile}", "--hide-scrollbars", "about:blank"]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
        self.process = subprocess.Popen(
            command,
            pass_fds=(3, 4),
            preexec_fn=pipe_on_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(chrome_reads)
        os.close(chrome_writes)
        self._next_id = 0
        self._buffer = b""

    def send(self, method: str, params: dict[str, Any] | None = None, **where: str) -> Any:
        """One DevTools command (``sessionId=`` for a page), and its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}, **where}
        os.write(self._requests, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} within 30 s")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited while answering {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # anything else is an event: not needed
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        os.close(self._requests)
        os.close(self._replies)


def run_example() -> tuple[subprocess.Popen[str], str, str]:
    """The example, running with MLflow kept open: its trace URL and the final run's span id."""
    example = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--keep-open"], stdout=subprocess.PIPE, text=True
    )
    assert example.stdout is not None
    url = final = ""
    for line in example.stdout:  # the example bounds its own waits
        print(f"  example: {line.rstrip()}")
        if found := re.search(r"\(span (\w+)\).*; link to span", line):
            final = found.group(1)
        if line.startswith("Open it: "):
            url = line.split(": ", 1)[1].strip()
        if line.startswith("MLflow keeps running"):
            return example, url, final
    raise SystemExit(f"the example exited with {example.wait()} before MLflow was ready")


# What is looked for and clicked on MLflow's page (3.17), as JavaScript.
ROW = "document.querySelector('[data-testid=\"span-title-row-{span}\"]')"
BUTTON = "document.querySelector(`button[data-component-id='{name}']`)"
LINKS_TAB = (
    "[...document.querySelectorAll('[role=tab]')].find(t => t.innerText.startsWith('Links'))"
)
LINKS_SHOWN = (
    "[...document.querySelectorAll('[role=tabpanel]')].some(p => p.innerText.includes('{text}'))"
)
MIDDLE = (
    "(e => {{ const box = e.getBoundingClientRect();"
    " return [box.x + box.width / 2, box.y + box.height / 2]; }})({element})"
)
# The assistant's panel and the tips, out of the picture; the trace, full screen.
TIDY = (
    "mlflow.assistant.chat_panel.close",
    "mlflow.detect_issues.guidance.dismiss",
    "mlflow.evaluations_review.modal.fullscreen",
)


class Page:
    """One tab of :class:`Chromium`."""

    def __init__(self, chromium: Chromium) -> None:
        self.chromium = chromium
        target = chromium.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = chromium.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics)

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.chromium.send(method, params, sessionId=self.session)

    def evaluate(self, script: str) -> Any:
        answer = self.send("Runtime.evaluate", {"expression": script, "returnByValue": True})
        return answer.get("result", {}).get("value")

    def wait_for(self, script: str, what: str) -> None:
        deadline = time.monotonic() + 30
        while not self.evaluate(script):
            if time.monotonic() > deadline:
                raise TimeoutError(f"MLflow's page did not show {what} within 30 s")
            time.sleep(0.2)  # poll interval; the deadline bounds the wait

    def click(self, element: str) -> None:
        """Click the middle of ``element`` (a JavaScript expression) with the mouse."""
        x, y = self.evaluate(MIDDLE.format(element=element))
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )


def screenshot(url: str, final: str, out: Path) -> None:
    """The trace at ``url``, the final run selected and its links shown, saved to ``out``."""
    with tempfile.TemporaryDirectory(
        prefix="natsmw-chromium-", ignore_cleanup_errors=True
    ) as profile:
        chromium = Chromium(Path(profile))
        try:
            page = Page(chromium)
            page.send("Page.navigate", {"url": url})
            row = ROW.format(span=final)
            page.wait_for(f"!!{row}", "the trace's spans")
            for name in TIDY:
                page.evaluate(f"{BUTTON.format(name=name)}?.click()")
            page.evaluate(f"{row}.click()")
            page.wait_for(f"!!{LINKS_TAB}", "the final run's links")
            page.click(LINKS_TAB)  # a tab answers the mouse, not a scripted click()
            page.wait_for(LINKS_SHOWN.format(text="deferred_by"), "the link to the deferring run")
            shot = page.send("Page.captureScreenshot", {"format": "png"})
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            chromium.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("deferred-trace.png"))
    args = parser.parse_args()
    example, url, final = run_example()
    try:
        if not url or not final:
            raise SystemExit("the example printed no trace URL or no linked final run")
        screenshot(url, final, args.out)
        print(f"saved {args.out}")
    finally:
        example.send_signal(signal.SIGINT)  # the example stops its MLflow
        example.wait(timeout=30)


if __name__ == "__main__":
    main()
