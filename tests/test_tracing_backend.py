"""natsmw's traces in a real tracing backend: an MLflow tracking server, fed over OTLP/HTTP.

The test starts MLflow itself (a subprocess on a free port, its store in a temporary
directory), sends a deferred message through ``compose(with_tracing(), with_delay_cap(...))``
and reads the trace back through MLflow's own REST API: the ``send`` span of the publisher, the
run that deferred the message, and the run after the deadline, with a link to the deferring
run. MLflow keeps span links; Arize Phoenix, also on PyPI, drops them (and so could not show
the last one). Neither keeps the span kind: test_tracing.py pins kinds down. How holds appear
is left to test_tracing.py too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from natsmw import compose, handler_calls, publish, serve_parked, with_delay_cap, with_tracing
from natsmw.server import NatsServer
from tests.conftest import Connection, connect

CAP = 0.25
DELAY = 1.0  # over the cap: parked, or held
STARTUP = 90.0  # seconds MLflow may take to answer /health (6 to 15 on 2 loaded cores)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MlflowServer:
    """``mlflow server`` from this environment, on a free loopback port, with its store in
    ``workdir``: ready once its ``/health`` answers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "mlflow.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        store = f"sqlite:///{self.workdir / 'mlflow.db'}"
        command = [sys.executable, "-m", "mlflow", "server", "--workers", "1"]
        command += ["--host", "127.0.0.1", "--port", port, "--backend-store-uri", store]
        command += ["--default-artifact-root", str(self.workdir / "artifacts")]
        # No job runner (seven more processes), no usage reports sent anywhere.
        quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **quiet, "DO_NOT_TRACK": "true"},
                start_new_session=True,
            )
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self._process.returncode} before it was "
                    f"ready; its log:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(0.2)  # poll interval; the deadline bounds the wait
        self.stop()
        raise TimeoutError(
            f"mlflow server did not answer {self.url}/health within {STARTUP:.0f} s; "
            f"its log:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        """Stop the server and the workers it started (its own process group)."""
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=5)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request to MLflow's REST API, answered in JSON."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def new_experiment(self, name: str) -> str:
        answer = self.call("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
        return str(answer["experiment_id"])

    def trace_ids(self, experiment_id: str) -> list[str]:
        where = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}
        answer = self.call("POST", "/api/3.0/mlflow/traces/search", {"locations": [where]})
        return [trace["trace_id"] for trace in answer.get("traces", [])]

    def spans(self, trace_id: str) -> list[StoredSpan]:
        answer = self.call("GET", f"/api/3.0/mlflow/traces/get?trace_id={trace_id}")
        return [StoredSpan.read(span) for span in answer["trace"].get("spans", [])]


@dataclass(frozen=True)
class StoredSpan:
    """A span as MLflow gives it back (its OTLP JSON: ids in base64, typed values)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: int
    attributes: dict[str, Any]
    events: list[str]
    links: list[tuple[str, str]]  # (trace id, span id), hex

    @classmethod
    def read(cls, span: dict[str, Any]) -> StoredSpan:
        parent = span.get("parent_span_id")
        return cls(
            name=span["name"],
            trace_id=_hex(span["trace_id"]),
            span_id=_hex(span["span_id"]),
            parent_id=_hex(parent) if parent else None,
            start=int(span["start_time_unix_nano"]),
            attributes=_values(span.get("attributes", [])),
            events=[event["name"] for event in span.get("events", [])],
            links=[
                (_hex(link["trace_id"]), _hex(link["span_id"])) for link in span.get("links", [])
            ],
        )


def _hex(encoded: str) -> str:
    return base64.b64decode(encoded).hex()


def _values(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP JSON attributes as a dict: ``{"key": k, "value": {"int_value": 3}}`` -> ``{k: 3}``."""
    return {item["key"]: next(iter(item["value"].values()), None) for item in attributes}


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@dataclass
class Traced:
    """A connection whose spans go to MLflow, into an experiment of the test's own."""

    conn: Connection
    tracer_provider: TracerProvider
    experiment_id: str


@pytest.fixture
async def traced(
    mlflow: MlflowServer, own_server: NatsServer, request: pytest.FixtureRequest
) -> AsyncIterator[Traced]:
    experiment_id = mlflow.new_experiment(request.node.name)
    exporter = OTLPSpanExporter(
        endpoint=f"{mlflow.url}/v1/traces", headers={"x-mlflow-experiment-id": experiment_id}
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "natsmw-tests"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="REMINDERS", subjects=["reminders.>"])
    yield Traced(conn, provider, experiment_id)
    if not conn.nc.is_closed:
        await conn.nc.close()
    provider.shutdown()


async def send_deferred(traced: Traced, *, parking: bool) -> None:
    """Publish one message whose handler asks for ``DELAY`` on its first call and acks on its
    second; return once that second run is over and every span has been sent to MLflow."""
    js = traced.conn.js
    acked = asyncio.Event()

    @compose(
        with_tracing(tracer_provider=traced.tracer_provider),
        with_delay_cap(CAP, parking=parking),
    )
    async def remind(msg: Msg) -> None:
        if handler_calls(msg) == 1:
            await msg.nak(delay=DELAY)
            return
        await msg.ack()
        acked.set()

    await js.subscribe("reminders.>", durable="reminder", cb=remind, manual_ack=True)
    serving = None
    if parking:
        serving = await serve_parked(
            js, remind, stream="REMINDERS", consumer="reminder", manual_ack=True
        )
    await publish(js, "reminders.new", b"call the customer", tracer_provider=traced.tracer_provider)
    await asyncio.wait_for(acked.wait(), timeout=15)
    if serving is not None:
        await serving.stop()  # due messages being handled finish first
    await traced.conn.nc.drain()  # so does the subscription's callback: every span has ended
    assert traced.tracer_provider.force_flush(timeout_millis=10_000)


async def stored_trace(mlflow: MlflowServer, experiment_id: str) -> list[StoredSpan]:
    """The experiment's trace that holds the send span and two runs, once MLflow has them,
    in the order the spans started."""
    deadline = time.monotonic() + 15
    seen: list[list[StoredSpan]] = []
    while time.monotonic() < deadline:
        seen = []
        for trace_id in await asyncio.to_thread(mlflow.trace_ids, experiment_id):
            spans = await asyncio.to_thread(mlflow.spans, trace_id)
            runs = [s for s in spans if s.attributes.get("messaging.operation.type") == "process"]
            if len(runs) >= 2 and any(s.name == "send reminders.new" for s in spans):
                return sorted(spans, key=lambda s: s.start)
            seen.append(spans)
        await asyncio.sleep(0.1)  # poll interval; the deadline bounds the wait
    raise AssertionError(f"MLflow did not get the whole trace within 15 s; it has {seen}")


@pytest.mark.parametrize(
    ("parking", "deferral_event"),
    [(True, "natsmw.delay.parked"), (False, "natsmw.delay.capped")],
    ids=["parked", "held"],
)
async def test_backend_shows_deferred_message_from_send_to_final_run(
    mlflow: MlflowServer, traced: Traced, parking: bool, deferral_event: str
) -> None:
    await send_deferred(traced, parking=parking)

    spans = await stored_trace(mlflow, traced.experiment_id)
    [send] = [s for s in spans if s.name == "send reminders.new"]
    runs = [s for s in spans if s.attributes.get("messaging.operation.type") == "process"]
    deferring, final = runs[0], runs[-1]

    assert send.parent_id is None
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.destination.name"] == "reminders.new"

    assert deferring.name.startswith("process reminders.")
    assert deferring.parent_id == send.span_id  # the message's creation context
    assert deferring.attributes["natsmw.message.delivery_count"] == 1
    assert deferral_event in deferring.events

    assert final.name.startswith("process reminders.")
    assert final.trace_id == send.trace_id
    assert final.parent_id == send.span_id
    assert final.attributes["natsmw.settlement"] == "ack"
    assert final.attributes["natsmw.message.delivery_count"] >= 2
    assert (deferring.trace_id, deferring.span_id) in final.links  # the run that deferred it
