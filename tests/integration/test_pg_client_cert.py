"""Client certificates to PostgreSQL: a private cluster that authenticates ``device`` by its
certificate alone (hba ``cert``, the CN is the role), and the sidecar's backend connecting
with ``sslcert``/``sslkey`` in the URL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.config import DatabaseConfig, Limits, PoolSettings
from tests.pgcluster import PgCluster, binaries_missing
from tests.tls_ca import Issued, TestCA

pytestmark = pytest.mark.skipif(binaries_missing() is not None, reason=str(binaries_missing()))

PORT = 19262
HBA = ["hostssl all device 127.0.0.1/32 cert", "host all device 127.0.0.1/32 reject"]


@pytest.fixture(scope="module")
def cert_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("pgcert")
    ca, other = TestCA(root / "ca"), TestCA(root / "other", "another CA")
    server = ca.server("server", names=("localhost",), ips=())
    cluster = PgCluster(port=PORT, hba=HBA).with_tls(server.cert, server.key, client_ca=ca.cert)
    cluster.start()

    async def make_role() -> None:
        conn = await asyncpg.connect(cluster.admin_dsn())
        await conn.execute("CREATE ROLE device LOGIN")  # no password at all
        await conn.execute("GRANT CREATE ON DATABASE postgres TO device")
        await conn.close()

    asyncio.run(make_role())
    try:
        yield {
            "cluster": cluster,
            "ca": ca,
            "device": ca.client("device", "device"),
            "intruder": ca.client("intruder", "intruder"),
            "forged": other.client("forged", "device"),
        }
    finally:
        cluster.destroy()


def _url(ca: TestCA, client: Issued | None) -> str:
    query = f"sslmode=verify-full&sslrootcert={ca.cert}"
    if client is not None:
        query += f"&sslcert={client.cert}&sslkey={client.key}"
    return f"postgresql://device@localhost:{PORT}/postgres?{query}"


async def _health(dsn: str) -> dict[str, object]:
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=dsn,
        pool_settings=PoolSettings(min_connections=1, max_connections=2, timeout_seconds=3),
    )
    backend = PostgresBackend(cfg, Limits())
    await backend.start()
    try:
        return await backend.health()
    finally:
        await backend.close()


async def test_a_client_certificate_authenticates_and_the_session_is_encrypted(
    cert_pg: dict[str, object],
) -> None:
    ca, device, cluster = cert_pg["ca"], cert_pg["device"], cert_pg["cluster"]
    assert isinstance(ca, TestCA) and isinstance(device, Issued)
    assert isinstance(cluster, PgCluster)
    assert (await _health(_url(ca, device)))["status"] == "up"
    conn = await asyncpg.connect(_url(ca, device))
    try:
        row = await conn.fetchrow(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert row is not None and row["ssl"] is True
    assert "device" in str(row["client_dn"])


@pytest.mark.parametrize("which", ["none", "intruder", "forged"])
async def test_no_wrong_or_foreign_certificate_is_refused_as_unavailable(
    cert_pg: dict[str, object], which: str
) -> None:
    ca = cert_pg["ca"]
    assert isinstance(ca, TestCA)
    client = None if which == "none" else cert_pg[which]
    assert client is None or isinstance(client, Issued)
    health = await _health(_url(ca, client))
    assert health["status"] == "down"
    assert health["error"] == "database_unavailable"  # never a 500 internal_error
    key_text = Path(client.key).read_text() if client is not None else "PRIVATE KEY"
    assert key_text not in str(health)
