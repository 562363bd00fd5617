"""A shared sidecar on a non-loopback address: refused without token mode; in token mode
over plain HTTP it starts with a warning; with ``--tls-cert/--tls-key/--tls-client-ca`` a
real TLS client with a client certificate and a bearer token is served, and a client
without the certificate, with another CA, or in plaintext is not."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy.policy import hash_token
from tests.e2e.test_tls_listener import _stop
from tests.tls_ca import TestCA

pytestmark = pytest.mark.e2e
TOKEN = "shared-listener-token-4e8a"


def _address() -> str | None:
    """This machine's own non-loopback IPv4 address (no packet is sent), else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # a route is looked up, nothing is sent
            host = str(s.getsockname()[0])
        except OSError:
            return None
    return None if host.startswith("127.") or host == "0.0.0.0" else host


HOST = _address()
needs_address = pytest.mark.skipif(HOST is None, reason="no non-loopback IPv4 address")


def _policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "svc.yaml").write_text(
        f"service: svc\nidentity: {{tokens: ['{hash_token(TOKEN)}']}}\n"
        "grants:\n  - collections: ['*']\n    operations: [read, create]\n"
    )
    return directory


def _start(tmp_path: Path, port: int, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    assert HOST is not None
    log = tmp_path / f"dbproxy-{port}.log"
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--host", HOST, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--data-dir", str(tmp_path / "data"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "DBPROXY_LOG_LEVEL": "INFO"},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "listening on" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    assert "listening on" in log.read_text(), log.read_text()
    return proc, log


@needs_address
def test_open_mode_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    assert HOST is not None
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--host", HOST, "--port", "19270"]
    run = subprocess.run(
        [*argv, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert f"refusing to listen on {HOST}" in run.stderr


@needs_address
def test_token_mode_in_plain_http_is_warned(tmp_path: Path) -> None:
    proc, log = _start(tmp_path, 19271, "--policies", str(_policies(tmp_path)))
    try:
        req = urllib.request.Request(f"http://{HOST}:19271/api/db/items/x")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        info.value.close()
        assert info.value.code == 401  # no token: nobody is trusted for reaching the port
    finally:
        _stop(proc)
    assert "in plain HTTP" in log.read_text()


def _call(url: str, ctx: ssl.SSLContext, token: str | None, body: object = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code)


@needs_address
def test_token_mode_over_mutual_tls_on_a_shared_address(tmp_path: Path) -> None:
    assert HOST is not None
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    server = ca.server("sidecar", names=("sidecar.local",), ips=(HOST,))
    client = ca.client("orders", "orders")
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    tls += ["--tls-client-ca", str(ca.cert)]
    proc, log = _start(tmp_path, 19272, "--policies", str(_policies(tmp_path)), *tls)
    base = f"https://{HOST}:19272/api/db"
    good = ssl.create_default_context(cafile=str(ca.cert))
    good.load_cert_chain(str(client.cert), str(client.key))
    try:
        assert _call(f"{base}/items", good, TOKEN, {"_id": "a", "n": 1}) == 201
        assert _call(f"{base}/items/a", good, TOKEN) == 200
        assert _call(f"{base}/items/a", good, None) == 401  # TLS alone is no identity
        assert _call(f"{base}/items/a", good, "not-the-token") == 401
        no_cert = ssl.create_default_context(cafile=str(ca.cert))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _call(f"{base}/items/a", no_cert, TOKEN)
        wrong_ca = ssl.create_default_context(cafile=str(other.cert))
        wrong_ca.load_cert_chain(str(client.cert), str(client.key))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _call(f"{base}/items/a", wrong_ca, TOKEN)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{HOST}:19272/api/db/health", timeout=5)
    finally:
        _stop(proc)
    text = log.read_text()
    assert f"listening on https://{HOST}:19272" in text
    assert "in plain HTTP" not in text and TOKEN not in text
