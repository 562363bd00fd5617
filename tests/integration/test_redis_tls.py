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

PORT = 18631


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[TestCA, TestCA]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    server = ca.server("redis", names=("localhost",), ips=("127.0.0.1",))
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(PORT),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(server.cert),
            "--tls-key-file",
            str(server.key),
            "--tls-ca-cert-file",
            str(ca.cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        assert proc.poll() is None, "redis-server (TLS) did not start"
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
