"""TLS and rotating credentials on a private PostgreSQL (ssl = on, a test CA, scram auth)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.config.databases import Secrets
from proxy.config.rotation import CredentialWatcher
from proxy.problems import Problems
from tests.pgcluster import PgCluster, binaries_missing
from tests.tls_ca import TestCA

pytestmark = pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing()))

PORT = 19260
HBA = [
    "hostssl all app 127.0.0.1/32 scram-sha-256",
    "hostnossl all app 127.0.0.1/32 reject",
]


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, TestCA, TestCA]]:
    root = tmp_path_factory.mktemp("pgtls")
    ca, other = TestCA(root / "ca"), TestCA(root / "other", "another CA")
    server = ca.server("server", names=("localhost",), ips=())
    cluster = PgCluster(port=PORT, hba=HBA).with_tls(server.cert, server.key)
    cluster.start()

    async def make_role() -> None:
        conn = await asyncpg.connect(cluster.admin_dsn())
        await conn.execute("CREATE ROLE app LOGIN PASSWORD 'first-secret'")
        await conn.execute("GRANT CREATE ON DATABASE postgres TO app")
        await conn.close()

    asyncio.run(make_role())
    try:
        yield cluster, ca, other
    finally:
        cluster.destroy()


def _db(dsn: str) -> DatabaseConfig:
    return DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=dsn,
        pool_settings=PoolSettings(min_connections=2, max_connections=4, timeout_seconds=3),
    )


def _url(password: str, query: str) -> str:
    return f"postgresql://app:{password}@localhost:{PORT}/postgres?{query}"


async def _health(dsn: str) -> dict[str, object]:
    backend = PostgresBackend(_db(dsn), Limits())
    await backend.start()
    try:
        return await backend.health()
    finally:
        await backend.close()


async def test_verify_full_encrypts_every_session(tls_pg: tuple[PgCluster, TestCA, TestCA]) -> None:
    cluster, ca, _ = tls_pg
    backend = PostgresBackend(
        _db(_url("first-secret", f"sslmode=verify-full&sslrootcert={ca.cert}")), Limits()
    )
    await backend.start()
    try:
        assert (await backend.health())["status"] == "up"
        admin = await asyncpg.connect(cluster.admin_dsn())
        rows = await admin.fetch(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.usename = 'app'"
        )
        await admin.close()
        assert rows and all(r["ssl"] for r in rows), rows
        assert {r["version"] for r in rows} <= {"TLSv1.2", "TLSv1.3"}
    finally:
        await backend.close()


async def test_wrong_ca_is_refused_naming_the_certificate(
    tls_pg: tuple[PgCluster, TestCA, TestCA],
) -> None:
    _, _, other = tls_pg
    health = await _health(_url("first-secret", f"sslmode=verify-full&sslrootcert={other.cert}"))
    assert health["status"] == "down"
    assert health["error"] == "database_unavailable"
    assert "certificate" in str(health["message"])
    assert "first-secret" not in str(health)


async def test_wrong_host_name_is_refused(tls_pg: tuple[PgCluster, TestCA, TestCA]) -> None:
    _, ca, _ = tls_pg  # the certificate names localhost, not 127.0.0.1
    wrong = await _health(
        f"postgresql://app:first-secret@127.0.0.1:{PORT}/postgres?sslmode=verify-full"
        f"&sslrootcert={ca.cert}"
    )
    assert wrong["status"] == "down"
    assert wrong["error"] == "database_unavailable"
    assert "certificate" in str(wrong["message"]) and "127.0.0.1" in str(wrong["message"])


async def test_plaintext_refused_when_tls_required(
    tls_pg: tuple[PgCluster, TestCA, TestCA],
) -> None:
    health = await _health(_url("first-secret", "sslmode=disable"))
    assert health == {
        "status": "down",
        "error": "database_unavailable",
        "message": health["message"],
    }
    assert "requires TLS" in str(health["message"])


async def test_bad_password_is_503_not_500(tls_pg: tuple[PgCluster, TestCA, TestCA]) -> None:
    _, ca, _ = tls_pg
    health = await _health(_url("wrong-secret", f"sslmode=verify-full&sslrootcert={ca.cert}"))
    assert health["error"] == "database_unavailable"
    assert "credentials" in str(health["message"])
    assert "wrong-secret" not in str(health)


async def test_rotation_under_load_loses_no_read(
    tls_pg: tuple[PgCluster, TestCA, TestCA], tmp_path: Path
) -> None:
    cluster, ca, _ = tls_pg
    secret = tmp_path / "pgpass"
    secret.write_text("first-secret\n")
    template = _url("${file:" + str(secret) + "}", f"sslmode=verify-full&sslrootcert={ca.cert}")
    secrets = Secrets({}, None)
    problems = Problems()
    dsn = secrets.resolve(template, "dsn", problems)
    assert dsn is not None and not problems.items
    db = _db(dsn)
    db = replace(db, secret=secrets.template(template))
    backend = PostgresBackend(db, Limits())
    await backend.start()
    migrations: Any = backend.migrations()  # what the runner holds from the start
    watcher = CredentialWatcher({"main": (db, backend.rotate_credentials)}, interval=0.1)
    watcher.start()
    failures: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with backend._conn(3.0) as conn:
                    await conn.fetchval("SELECT 1")
                done += 1
            except Exception as exc:  # counted, asserted below
                failures.append(exc)
            await asyncio.sleep(0.002)

    try:
        tasks = [asyncio.create_task(reader()) for _ in range(2)]
        await asyncio.sleep(0.5)
        admin = await asyncpg.connect(cluster.admin_dsn())
        await admin.execute("ALTER ROLE app PASSWORD 'second-secret'")
        secret.write_text("second-secret\n")
        for _ in range(50):
            if watcher.reloads:
                break
            await asyncio.sleep(0.1)
        assert watcher.reloads == 1
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'"
        )
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        sessions = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
        )
        # the migration runner's own sessions (made at start) use the new credential too
        assert "second-secret" in migrations.dsn
        async with migrations.session("rotation-test", lock=False) as session:
            assert session is not None
        await admin.execute("ALTER ROLE app PASSWORD 'first-secret'")
        await admin.close()
        assert sessions >= 1  # reconnected, with the new password
        assert done > 50
        assert failures == [], failures[:3]
    finally:
        await watcher.close()
        await backend.close()
