"""Credentials rotated under load through a real sidecar process: ALTER ROLE, the secret
file rewritten, SIGHUP, the old sessions terminated — no read fails, no password leaks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.test_tls_listener import PORT, _serve, _stop
from tests.pgcluster import PgCluster, binaries_missing

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing())),
]
PG_PORT = 19231


def _admin(cluster: PgCluster, *sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(cluster.admin_dsn())
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_rotation_under_load_through_the_sidecar(tmp_path: Path) -> None:
    cluster = PgCluster(port=PG_PORT, hba=["host all app 127.0.0.1/32 scram-sha-256"])
    cluster.start()
    try:
        _admin(
            cluster,
            "CREATE ROLE app LOGIN PASSWORD 'old-pw-1111'",
            "GRANT CREATE ON DATABASE postgres TO app",
        )
        secret = tmp_path / "pgpass"
        secret.write_text("old-pw-1111\n")
        config = tmp_path / "dbproxy.yaml"
        config.write_text(
            "databases:\n  - name: main\n    type: postgresql\n"
            f"    connection_string: postgresql://app:${{file:{secret}}}@127.0.0.1:{PG_PORT}/postgres\n"
        )
        proc, log = _serve(tmp_path, "--config", str(config), "--secrets-interval", "60")
        base = f"http://127.0.0.1:{PORT}/api/db/items"
        try:
            req = urllib.request.Request(
                base,
                data=json.dumps({"_id": "a", "n": 1}).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 201
            stop = threading.Event()
            ok, failed = [0], []

            def load() -> None:
                while not stop.is_set():
                    try:
                        with urllib.request.urlopen(base + "/a", timeout=5) as r:
                            assert r.status == 200
                        ok[0] += 1
                    except urllib.error.HTTPError as exc:
                        failed.append(f"{exc.code} {exc.read()[:200]!r}")
                    except (OSError, AssertionError) as exc:
                        failed.append(repr(exc))

            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            _admin(cluster, "ALTER ROLE app PASSWORD 'new-pw-2222'")
            secret.write_text("new-pw-2222\n")
            os.kill(proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "credentials reloaded" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "credentials reloaded" in log.read_text()
            _admin(
                cluster,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
            )
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join()
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/api/db/connections") as r:
                connections = r.read().decode()
        finally:
            _stop(proc)
        text = log.read_text()
        assert failed == [], failed[:3]
        assert ok[0] > 100
        for leaked in ("old-pw-1111", "new-pw-2222"):
            assert leaked not in text and leaked not in connections
    finally:
        cluster.destroy()
