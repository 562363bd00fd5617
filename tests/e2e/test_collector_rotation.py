"""The central collector's own database credential rotates like the sidecar's: a real
``dbproxy collector`` whose ``--database`` (TLS, verify-full against a test CA) reads
``${file:}``, pushes running concurrently,
the role's password changed on a private cluster, the file rewritten, SIGHUP, the old
sessions ended — every push accepted, none lost, no password anywhere."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.observe.pusher import BATCHES_PATH
from proxy.observe.stats import StatsRecorder
from tests.pgcluster import binaries_missing
from tests.rotation_support import (
    admin,
    app_cluster,
    end_app_sessions,
    password_works,
    rotate_password,
    wait_for_log,
    wait_for_old_sessions_to_go,
)
from tests.tls_ca import TestCA

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing())),
]
PORT, PG_PORT = 19201, 19202
TOKEN = "collector-rotation-token-5c1e"
OLD, NEW = "coll-old-pw-8d2a", "coll-new-pw-41fb"
COLLECTOR = (sys.executable, "-m", "proxy.cli", "collector", "--port", str(PORT))
COLLECTOR += ("--secrets-interval", "60")  # the rotation comes from SIGHUP
RELOADED = "collector database: credentials reloaded"


def _collector(tmp_path: Path, secret: Path, ca: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "collector.log"
    url = f"postgresql://app:${{file:{secret}}}@localhost:{PG_PORT}/postgres"
    url += f"?sslmode=verify-full&sslrootcert={ca}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*COLLECTOR, "--database", url, "--token", TOKEN],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DBPROXY_LOG_LEVEL": "DEBUG"},
        )
    return proc, log


async def _ready(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        assert proc.poll() is None, "the collector exited early"
        try:
            async with session.get(f"{base}/api/db/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the collector did not become ready")


class Load:
    """``workers`` tasks pushing one-call batches as fast as the collector takes them."""

    def __init__(self, session: aiohttp.ClientSession, base: str, workers: int = 4) -> None:
        self.session, self.url = session, base + BATCHES_PATH
        self.accepted, self.failed = 0, list[str]()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._push(f"rot{i}")) for i in range(workers)]

    async def _push(self, service: str) -> None:
        recorder = StatsRecorder(service)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        while not self._stop.is_set():
            recorder.record("items", "find", 1.0, 1, "find items {}", True, None)
            body = orjson.dumps(recorder.drain_batch())
            try:
                async with self.session.post(self.url, data=body, headers=headers) as r:
                    text = await r.text()
                    if r.status == 202:
                        self.accepted += 1
                    else:
                        self.failed.append(f"{r.status} {text[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed.append(repr(exc))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_collector_database_password_rotates_under_load(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.server("pg", names=("localhost",), ips=())
    cluster = await asyncio.to_thread(app_cluster, PG_PORT, OLD, (server.cert, server.key))
    secret = tmp_path / "collector-pg-password"
    secret.write_text(OLD + "\n")
    proc, log = _collector(tmp_path, secret, ca.cert)
    base = f"http://127.0.0.1:{PORT}"
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await _ready(session, base, proc)
            load = Load(session, base)
            await asyncio.sleep(1.0)
            before = load.accepted
            rotated = await asyncio.to_thread(rotate_password, cluster, NEW)
            secret.write_text(NEW + "\n")
            os.kill(proc.pid, signal.SIGHUP)
            assert await asyncio.to_thread(wait_for_log, log, RELOADED) == 1, log.read_text()
            # graceful: the sessions opened with OLD go as they come back to the pool
            old, new = await asyncio.to_thread(wait_for_old_sessions_to_go, cluster, rotated)
            graceful = load.accepted
            # and a session ended under a push costs nothing either (the merge is retried)
            ended = await asyncio.to_thread(end_app_sessions, cluster)
            await asyncio.sleep(1.5)
            await load.stop()
            encrypted = await asyncio.to_thread(
                admin,
                cluster,
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.usename = 'app'",
            )
            for path in ("/api/db/health", "/metrics"):
                async with session.get(base + path) as r:
                    seen.append(await r.text())
                    assert r.status == 200, seen[-1]
            async with session.get(
                base + "/api/db/performance", params={"scope": "fleet", "top": "100"}
            ) as r:
                fleet = await r.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        seen.append(log.read_text(errors="replace"))
        old_refused = not await asyncio.to_thread(password_works, cluster, OLD)
        await asyncio.to_thread(cluster.destroy)
    assert load.failed == [], load.failed[:5]
    sessions = [row[0] for row in encrypted[0]]  # the collector's sessions, after rotation
    assert sessions and all(sessions), sessions  # all over TLS (verify-full, the test CA)
    assert old == 0, (old, new)  # the old sessions went as they came back to the pool
    assert ended >= 1  # sessions existed (opened with NEW) and were ended under load
    assert old_refused  # the rotation was real: the old password no longer logs in
    assert graceful > before and load.accepted - graceful > 20, (before, graceful)
    calls = sum(s["calls"] for s in fleet["services"] if s["service"].startswith("rot"))
    assert calls == load.accepted  # every accepted push merged, none twice
    assert '"status":"up"' in seen[0].replace(" ", "")
    for text in seen:
        assert OLD not in text and NEW not in text
    assert "app:***@" in seen[-1]  # the log names the database, redacted
