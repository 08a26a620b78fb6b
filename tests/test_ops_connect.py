"""``natsmw deferred`` against servers that want more than a URL: TLS, users with
permissions, credentials files. Each test starts its own nats-server with the flags or the
configuration it needs (the embedded ``NatsServer`` runs plain ones)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from natsmw.server import _wait_until, find_nats_server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natsmw", "deferred", *args],
        capture_output=True, text=True, timeout=90, env={**os.environ, "NATS_URL": ""},
    )  # fmt: skip


def serve(tmp_path: Path, *flags: str) -> Iterator[int]:
    """A nats-server with ``flags``, JetStream on, on a free port; stopped after."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [find_nats_server(), "--jetstream", "--store_dir", str(tmp_path / "store"),
         "--addr", "127.0.0.1", "--port", str(port), *flags],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def accepting() -> bool:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        _wait_until(accepting, 10.0, lambda: TimeoutError("nats-server did not start"))
        yield port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
            cwd=tmp_path)  # fmt: skip
    return tmp_path


def test_tls_options_reach_a_tls_server(certificates: Path) -> None:
    tls = ("--tls", "--tlscert", str(certificates / "server.pem"),
           "--tlskey", str(certificates / "server.key"))  # fmt: skip
    for port in serve(certificates, *tls):
        url = f"tls://127.0.0.1:{port}"
        trusted = cli("list", "--server", url, "--tlsca", str(certificates / "ca.pem"))
        # Connected and asked: an empty server has no natsmw data (exit 3), not a TLS error.
        assert trusted.returncode == 3, trusted.stderr
        assert "no natsmw data" in trusted.stderr
        untrusted = cli("list", "--server", url)
        assert untrusted.returncode == 1
        assert "cannot connect" in untrusted.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_a_permission_violation_is_named(tmp_path: Path) -> None:
    (tmp_path / "auth.conf").write_text(
        "authorization { users = [\n"
        "  {user: admin, password: admin}\n"
        '  {user: ops, password: ops, permissions: {publish: {deny: ["$JS.API.DIRECT.GET.>",'
        ' "$JS.API.STREAM.MSG.GET.>"]}}}\n'
        "] }\n"
    )
    for port in serve(tmp_path, "--config", str(tmp_path / "auth.conf")):
        url = f"nats://127.0.0.1:{port}"

        async def make_a_record(url: str) -> None:
            nc = await nats.connect(url, user="admin", password="admin")
            js = nc.jetstream()
            kv = await js.create_key_value(bucket="natsmw_deadlines", direct=True)
            await kv.put("S.C.1", b"{}")
            await nc.close()

        asyncio.run(make_a_record(url))
        started = time.monotonic()
        refused = cli("list", "--server", url, "--user", "ops", "--password", "ops")
        assert refused.returncode == 1
        assert "no permission" in refused.stderr
        # The server's own words, with the subject it refused (nats-py lowercases them).
        assert 'permissions violation for publish to "$js.api.direct.get.' in refused.stderr
        # At the refusal, not after the request's 10 s timeout (a refused request is never
        # answered).
        assert time.monotonic() - started < 8.0


def test_creds_without_nkeys_says_what_to_install(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n")
    # nkeys is an extra of nats-py, not installed with natsmw: as on an operator's machine.
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.modules['nkeys'] = None; from natsmw.__main__ import main; "
         "sys.exit(main())",
         "deferred", "list", "--server", "nats://127.0.0.1:1", "--creds", str(creds)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "--creds needs 'nkeys': pip install 'nats-py[nkeys]'" in result.stderr
