"""The sidecar's own listener over TLS (and mutual TLS) with a real TLS client, and no
secret in its logs, health, connections, metrics or errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.tls_ca import TestCA

PORT = 19230
CANARY = "leak-canary-pw-7f3a"


def _get(url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "dbproxy exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("dbproxy did not listen")


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "dbproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(PORT), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "DBPROXY_LOG_LEVEL": "DEBUG"},
        )
    _wait(proc, PORT)
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.e2e
def test_mutual_tls_listener(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.server("sidecar", names=("localhost",), ips=("127.0.0.1",))
    client = ca.client("service", "orders")
    proc, _ = _serve(
        tmp_path,
        "--data-dir",
        str(tmp_path / "data"),
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        "--tls-client-ca",
        str(ca.cert),
    )
    try:
        url = f"https://127.0.0.1:{PORT}/api/db/health"
        ctx = ssl.create_default_context(cafile=str(ca.cert))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        status, body = _get(url, ctx)
        assert status == 200 and json.loads(body)["status"] == "ready"
        no_cert = ssl.create_default_context(cafile=str(ca.cert))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(url, no_cert)  # refused in the handshake: no client certificate
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(f"http://127.0.0.1:{PORT}/api/db/health")  # plaintext gets no answer
        wrong_ca = ssl.create_default_context(cafile=str(TestCA(tmp_path / "x", "x").cert))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(url, wrong_ca)
    finally:
        _stop(proc)


@pytest.mark.e2e
def test_no_secret_leaks(tmp_path: Path) -> None:
    secret = tmp_path / "pgpass"
    secret.write_text(CANARY + "\n")
    config = tmp_path / "dbproxy.yaml"
    config.write_text(
        "databases:\n"
        "  - name: main\n"
        "    type: postgresql\n"
        f"    connection_string: postgresql://postgres:${{file:{secret}}}@127.0.0.1:5432/postgres\n"
        "  - name: gone\n"
        "    type: postgresql\n"
        f"    connection_string: postgresql://postgres:{CANARY}@127.0.0.1:1/postgres\n"
    )
    proc, log = _serve(tmp_path, "--config", str(config))
    try:
        base = f"http://127.0.0.1:{PORT}"
        seen = []
        for path in (
            "/api/db/health",
            "/api/db/connections",
            "/metrics",
            "/api/db/gone/collections/x/documents",
            "/api/db/nope/collections/x/documents",
        ):
            seen.append(_get(base + path)[1])
        seen.append(log.read_text(errors="replace"))
    finally:
        _stop(proc)
    seen.append(log.read_text(errors="replace"))
    for text in seen:
        assert CANARY not in text
    assert "***" in seen[1]  # connections show the redacted DSN


def _send(url: str, method: str, body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {CANARY}-token")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.e2e
def test_no_secret_leaks_from_a_database_that_cannot_be_reached(tmp_path: Path) -> None:
    """Every kind of request to a database whose password is the canary, unreachable: the
    answers are 503 database_unavailable and neither they, the log, health, connections or
    metrics carry the password or the bearer token the requests sent."""
    config = tmp_path / "dbproxy.yaml"
    config.write_text(
        "databases:\n"
        "  - name: gone\n"
        "    type: postgresql\n"
        f"    connection_string: postgresql://postgres:{CANARY}@127.0.0.1:1/postgres\n"
    )
    proc, log = _serve(tmp_path, "--config", str(config))
    try:
        base = f"http://127.0.0.1:{PORT}/api/db"
        answers = [
            _send(f"{base}/users/u1", "GET"),
            _send(f"{base}/users", "POST", b'{"name": "ann"}'),
            _send(f"{base}/users/query", "POST", b'{"filter": {"name": "ann"}}'),
            _send(f"{base}/users/count", "GET"),
            _send(f"{base}/users/aggregate", "POST", b'{"pipeline": [{"$match": {}}]}'),
            _send(f"{base}/batch", "POST", b'{"operations": []}'),
        ]
        seen = [text for _, text in answers]
        for path in ("/health", "/connections", "/stats"):
            seen.append(_send(base + path, "GET")[1])
        seen.append(_send(f"http://127.0.0.1:{PORT}/metrics", "GET")[1])
    finally:
        _stop(proc)
    seen.append(log.read_text(errors="replace"))
    for status, text in answers[:5]:
        assert status == 503, (status, text)
        assert json.loads(text)["error"]["code"] == "database_unavailable", text
    for text in seen:
        assert CANARY not in text


@pytest.mark.e2e
def test_renewed_listener_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews the Secret and the kubelet swaps the mounted files: new
    connections get the new certificate; a pair that does not load keeps the old one."""
    ca = TestCA(tmp_path / "ca")
    first = ca.server("first", names=("localhost",), ips=())  # does not name 127.0.0.1
    renewed = ca.server("renewed", names=("localhost",), ips=("127.0.0.1",))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    args = ("--data-dir", str(tmp_path / "data"), "--tls-cert", str(cert), "--tls-key", str(key))
    proc, log = _serve(tmp_path, *args, "--secrets-interval", "0.2")
    url = f"https://127.0.0.1:{PORT}/api/db/health"
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    try:
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(url, ctx)  # the first certificate names localhost only
        cert.write_text("not a certificate\n")  # a half-written renewal: the old one stays
        time.sleep(0.6)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(url, ctx)
        key.write_bytes(renewed.key.read_bytes())
        cert.write_bytes(renewed.cert.read_bytes())
        deadline = time.monotonic() + 10
        while "listener: certificate reloaded" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        status, body = _get(url, ctx)
        assert status == 200 and json.loads(body)["status"] == "ready"
    finally:
        _stop(proc)
    assert "new certificate not loaded (keeping the old)" in log.read_text(errors="replace")
