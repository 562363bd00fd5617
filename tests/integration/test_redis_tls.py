"""Redis over TLS (``rediss://`` with a test CA): the cache's pipe and redis-py alike, on a
private ``redis-server --tls-port`` that accepts no plaintext."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.backends.redis.client import make_client
from proxy.backends.redis.resp import PipeBroken, open_pipe
from tests.tls_ca import TestCA

PORT = 19251


def _redis_tls(tmp_path: Path, port: int, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    """A private ``redis-server`` listening on a TLS port only (``--port 0``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    tls = ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    quiet = ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(
        [binary, "--port", "0", "--bind", "127.0.0.1", *tls, "--tls-auth-clients", "no", *quiet],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    assert proc.poll() is None, "redis-server (TLS) did not start"
    return proc


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[TestCA, TestCA]]:
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    server = ca.server("redis", names=("localhost",), ips=("127.0.0.1",))
    proc = _redis_tls(tmp_path, PORT, server.cert, server.key)
    try:
        yield ca, other
    finally:
        proc.terminate()
        proc.wait(5)


async def test_rediss_with_ca_for_pipe_and_redis_py(tls_redis: tuple[TestCA, TestCA]) -> None:
    ca, other = tls_redis
    url = f"rediss://127.0.0.1:{PORT}/0?ssl_ca_certs={ca.cert}"
    pipe = await open_pipe(url, 1.0, 2.0)
    try:
        assert await pipe.call("PING") == b"PONG"
    finally:
        pipe.close()
    client = make_client(url, 2.0, 2)
    try:
        assert await client.ping()
        ports = await client.config_get("*port")
        assert ports["port"] == "0" and ports["tls-port"] == str(PORT)  # TLS only
    finally:
        await client.aclose()
    with pytest.raises(PipeBroken, match="certificate was refused"):
        await open_pipe(f"rediss://127.0.0.1:{PORT}/0?ssl_ca_certs={other.cert}", 1.0, 2.0)
    with pytest.raises(PipeBroken):  # plaintext to the TLS port: no answer it can use
        pipe = await open_pipe(f"redis://127.0.0.1:{PORT}/0", 0.5, 1.0)
        try:
            await pipe.call("PING")
        finally:
            pipe.close()


async def test_wrong_host_name_and_wrong_ca_are_refused_by_both_clients(tmp_path: Path) -> None:
    """A certificate for ``localhost`` only, reached as 127.0.0.1: refused by the pipe and
    by redis-py, naming the host; another CA is refused by redis-py too; by the right name
    both get in."""
    import redis.exceptions

    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    server = ca.server("redis", names=("localhost",), ips=())
    port = PORT + 1
    proc = _redis_tls(tmp_path, port, server.cert, server.key)
    try:
        wrong_host = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca.cert}"
        with pytest.raises(PipeBroken, match=r"certificate was refused.*127\.0\.0\.1"):
            await open_pipe(wrong_host, 1.0, 2.0)
        for url, reason in (
            (wrong_host, r"127\.0\.0\.1"),
            (f"rediss://localhost:{port}/0?ssl_ca_certs={other.cert}", "certificate verify failed"),
        ):
            client = make_client(url, 2.0, 1)
            try:
                with pytest.raises(redis.exceptions.ConnectionError, match=reason):
                    await client.ping()
            finally:
                await client.aclose()
        right = f"rediss://localhost:{port}/0?ssl_ca_certs={ca.cert}"
        pipe = await open_pipe(right, 1.0, 2.0)
        try:
            assert await pipe.call("PING") == b"PONG"
        finally:
            pipe.close()
        client = make_client(right, 2.0, 1)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    finally:
        proc.terminate()
        proc.wait(5)
