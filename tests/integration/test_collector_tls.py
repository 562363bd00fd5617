"""The stats push over HTTPS verified against a CA (``collector_push.ca_file``), on a real
TLS listener: the right CA is accepted, another one refused with the certificate named."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from proxy.observe.pusher import BATCHES_PATH, StatsPusher
from proxy.observe.stats import StatsRecorder
from proxy.tls import client_context, server_context
from tests.tls_ca import TestCA

PORT = 18641


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
