"""A deferred message, end to end, in a tracing backend you can open: MLflow, fed over OTLP.

    pip install -e '.[backend]'
    python examples/tracing_backend.py --keep-open

starts an MLflow tracking server on a free local port (its store in a temporary directory),
sends one message through ``compose(with_tracing(), with_delay_cap(1))`` on an embedded
nats-server, and prints the trace id and the URL that shows the trace. The handler asks for a
3 s delay (think: 3 hours) on its first call, so natsmw parks the message in the server's
scheduler; 3 s later the same handler gets it again. MLflow shows the ``send`` span of the
publisher, the run that deferred the message (event ``natsmw.delay.parked``) and the run after
the deadline (event ``natsmw.delay.unparked``, and a link to the run that deferred it).
``--keep-open`` keeps MLflow running until Ctrl-C, so that you can open the URL.

With an MLflow of your own (``mlflow server --port 5000``), pass ``--mlflow
http://127.0.0.1:5000``: the trace goes to its experiment ``natsmw``. Any other OTLP backend is
fed the same way: point ``OTLPSpanExporter(endpoint=...)`` at it. MLflow is here because it
keeps span links, which tie the final run to the run that deferred it (Arize Phoenix drops
them); like Phoenix, it does not show span kinds (PRODUCER, CONSUMER).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from natsmw import compose, handler_calls, publish, serve_parked, with_delay_cap, with_tracing
from natsmw.server import NatsServer

CAP = 1.0  # seconds: stands in for a production cap of a minute
DELAY = 3.0  # seconds: stands in for the "remind me in 3 hours" of a real handler
EXPERIMENT = "natsmw"


def start_mlflow(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """``mlflow server`` on a free loopback port, its store in ``workdir``; returns its URL
    once ``/health`` answers, and the process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [sys.executable, "-m", "mlflow", "server", "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", store]
    command += ["--default-artifact-root", str(workdir / "artifacts")]
    # No job runner (seven more processes), no usage reports sent anywhere.
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = workdir / "mlflow.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **quiet, "DO_NOT_TRACK": "true"},
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                return url, process
        time.sleep(0.2)  # poll interval; the deadline bounds the wait
    stop(process)
    raise SystemExit(f"mlflow server did not start; its log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop MLflow and the worker it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


@contextlib.contextmanager
def mlflow_at(given: str | None) -> Iterator[str]:
    """The URL of the MLflow given, or of one started for the example and stopped after."""
    if given:
        yield given.rstrip("/")
        return
    if importlib.util.find_spec("mlflow") is None:
        raise SystemExit("MLflow is not installed here: pip install -e '.[backend]'")
    with tempfile.TemporaryDirectory(prefix="natsmw-mlflow-") as workdir:
        url, process = start_mlflow(Path(workdir))
        print(f"Started an MLflow tracking server at {url} (its store in {workdir})")
        try:
            yield url
        finally:
            stop(process)


def call(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to MLflow's REST API."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def experiment_id(url: str, name: str) -> str:
    try:
        found = call(url, "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
        return str(found["experiment"]["experiment_id"])
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
    return str(
        call(url, "POST", "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"]
    )


async def send_deferred(tracer_provider: TracerProvider) -> str:
    """Send one message that the handler defers, and return its trace id once it is handled."""
    handled = asyncio.Event()
    trace_ids: list[str] = []

    @compose(with_tracing(tracer_provider=tracer_provider), with_delay_cap(CAP))
    async def remind(msg: Msg) -> None:  # the handler you already have, unchanged
        trace_ids.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        if handler_calls(msg) == 1:
            print(f"The handler asks for nak(delay={DELAY}): natsmw parks the message.")
            await msg.nak(delay=DELAY)
            return
        print(f"{DELAY} s later the handler gets it again (call {handler_calls(msg)}), and acks.")
        await msg.ack()
        handled.set()

    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="REMINDERS", subjects=["reminders.>"])
        await js.subscribe("reminders.>", durable="reminder", cb=remind, manual_ack=True)
        # Something must bring parked messages back: the same handler, when they are due.
        serving = await serve_parked(
            js, remind, stream="REMINDERS", consumer="reminder", manual_ack=True
        )
        await publish(js, "reminders.new", b"call the customer", tracer_provider=tracer_provider)
        await asyncio.wait_for(handled.wait(), timeout=30)
        await serving.stop()
        await nc.drain()  # the handler's last run is over, and so is its span
    return trace_ids[0]


def stored_spans(url: str, trace_id: str) -> list[dict[str, Any]]:
    """The trace's spans as MLflow stores them, once the final run is among them."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(urllib.error.HTTPError):  # 404 until its first span is in
            found = call(url, "GET", f"/api/3.0/mlflow/traces/get?trace_id=tr-{trace_id}")
            spans: list[dict[str, Any]] = found["trace"].get("spans", [])
            if sum(span["name"].startswith("process ") for span in spans) >= 2:
                return sorted(spans, key=lambda span: int(span["start_time_unix_nano"]))
        time.sleep(0.2)  # poll interval; the deadline bounds the wait
    raise SystemExit(f"MLflow did not get the whole trace {trace_id} within 15 s")


def describe(span: dict[str, Any]) -> str:
    """One line for a span: its name and id, the delivery, events, and links but the one to
    its parent."""
    attributes = {a["key"]: next(iter(a["value"].values()), None) for a in span["attributes"]}
    text = f"{span['name']} (span {_hex(span['span_id'])})"
    if "natsmw.message.delivery_count" in attributes:
        text += f", delivery {attributes['natsmw.message.delivery_count']}"
        text += f", settled: {attributes.get('natsmw.settlement')}"
    for event in span.get("events", []):
        text += f"; event {event['name']}"
    for link in span.get("links", []):
        if link["span_id"] != span.get("parent_span_id"):
            why = {a["key"]: next(iter(a["value"].values())) for a in link.get("attributes", [])}
            text += f"; link to span {_hex(link['span_id'])} ({why.get('natsmw.link', '')})"
    return text


def _hex(encoded: str) -> str:
    return base64.b64decode(encoded).hex()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mlflow", metavar="URL", help="an MLflow server to use (default: start one)"
    )
    parser.add_argument("--keep-open", action="store_true", help="keep MLflow running until Ctrl-C")
    args = parser.parse_args()
    with mlflow_at(args.mlflow) as url:
        experiment = experiment_id(url, EXPERIMENT)
        exporter = OTLPSpanExporter(
            endpoint=f"{url}/v1/traces", headers={"x-mlflow-experiment-id": experiment}
        )
        provider = TracerProvider(resource=Resource.create({"service.name": "natsmw-example"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace_id = asyncio.run(send_deferred(provider))
        provider.shutdown()  # sends what is left
        spans = stored_spans(url, trace_id)
        print(f"Trace {trace_id}, as MLflow stores it:")
        for span in spans:
            print(f"  {describe(span)}")
        print(
            f"Open it: {url}/#/experiments/{experiment}/traces?selectedEvaluationId=tr-{trace_id}"
        )
        if args.keep_open:
            print("MLflow keeps running until Ctrl-C.", flush=True)
            for stopping in (signal.SIGINT, signal.SIGTERM):  # even where SIGINT was ignored
                signal.signal(stopping, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()


if __name__ == "__main__":
    main()
