"""The stats push over HTTPS verified against a CA (``collector_push.ca_file``), on a real
TLS listener: the right CA is accepted, another one refused with the certificate named."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from proxy.observe.pusher import BATCHES_PATH, StatsPusher
from proxy.observe.stats import StatsRecorder
from proxy.tls import client_context, server_context
from tests.tls_ca import TestCA

PORT = 19264


async def test_push_over_https_with_a_ca(tmp_path: Path) -> None:
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    cert = ca.server("collector", names=("localhost",), ips=("127.0.0.1",))
    received: list[bytes] = []

    async def batches(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"accepted": True})

    app = web.Application()
    app.router.add_post(BATCHES_PATH, batches)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(
        runner, "127.0.0.1", PORT, ssl_context=server_context(str(cert.cert), str(cert.key))
    )
    await site.start()
    url = f"https://127.0.0.1:{PORT}"
    good = StatsPusher(url, "t", StatsRecorder("svc"), tls=client_context(str(ca.cert)))
    bad = StatsPusher(url, "t", StatsRecorder("svc"), tls=client_context(str(other.cert)))
    try:
        assert await good._post(b"{}") == 200
        assert received == [b"{}"]
        assert await bad._post(b"{}") is None
        assert "certificate was refused" in bad._last_error
        assert len(received) == 1
    finally:
        await good.close(final_flush=False)
        await bad.close(final_flush=False)
        await runner.cleanup()


async def test_the_real_collector_serves_https(tmp_path: Path, pg_dsn: str) -> None:
    """``dbproxy collector --tls-cert --tls-key``: a real process; a push verified with the
    CA is accepted, plain HTTP and another CA are refused, and a half-given pair is exit 2."""
    import asyncio
    import subprocess
    import sys

    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "other CA")
    cert = ca.server("collector", names=("localhost",), ips=("127.0.0.1",))
    port = PORT + 1
    base = [
        sys.executable,
        "-m",
        "proxy.cli",
        "collector",
        "--port",
        str(port),
        "--database",
        pg_dsn,
    ]
    half = subprocess.run([*base, "--tls-cert", str(cert.cert)], capture_output=True, text=True)
    assert half.returncode == 2 and "go together" in half.stderr
    log = (tmp_path / "collector.log").open("wb")
    proc = subprocess.Popen(
        [*base, "--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--token", "t"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    good = StatsPusher(url, "t", StatsRecorder("svc"), tls=client_context(str(ca.cert)))
    bad = StatsPusher(url, "t", StatsRecorder("svc"), tls=client_context(str(other.cert)))
    plain = StatsPusher(f"http://127.0.0.1:{port}", "t", StatsRecorder("svc"))
    try:
        status = None
        for _ in range(100):  # until it listens
            status = await good._post(b'{"service": "svc", "batches": []}')
            if status is not None:
                break
            await asyncio.sleep(0.1)
        assert status == 400, good._last_error  # an HTTP answer (to a body it refuses), over TLS
        good.recorder.record("users", "find", 1.5, 2, "find users {}", True, None)
        await good.flush()  # a real batch, accepted
        assert good.counters()["sent"] == 1, good.counters()
        assert await bad._post(b"{}") is None
        assert "certificate was refused" in bad._last_error
        assert await plain._post(b"{}") is None  # no HTTP answer from a TLS listener
    finally:
        for p in (good, bad, plain):
            await p.close(final_flush=False)
        proc.terminate()
        proc.wait(10)
        log.close()
    assert "listening on https://" in (tmp_path / "collector.log").read_text()
