"""Pool saturation by one service while another keeps its latency: token mode, two services in
a policies directory of the test's own, one shared pool; ``flood`` fills it with slow queries
or with open transactions, ``calm`` keeps reading by id and listing."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.policy import hash_token
from tests.e2e.conftest import Server, start_server
from tests.pgcluster import PgCluster, binaries_missing, private_cluster

pytestmark = pytest.mark.e2e

POOL = 8  # max_connections of the one pool both services share
POOL_TIMEOUT = 2.0
FLOOD_SECONDS = 3.0
SLOW_ROWS = 50_000  # a regex scan over these takes a good fraction of a second
SLOW_FILTER = {"s": {"$regex": "(a|b)*c$"}}
CALM_MAX_LATENCY = 1.5  # well above a by-id read (milliseconds), below one pool wait
FLOOD = {"Authorization": "Bearer flood-token"}
CALM = {"Authorization": "Bearer calm-token"}


def policies(tmp: Path) -> Path:
    d = tmp / "policies"
    d.mkdir()
    (d / "flood.yaml").write_text(
        "service: flood\n"
        f"identity: {{tokens: ['{hash_token('flood-token')}']}}\n"
        "grants:\n"
        "  - collections: [slow, 'flood_*']\n"
        "    operations: [read, list, count, create, update, delete, transaction]\n"
        "limits:\n"
        "  rate: {per_second: 100000, burst: 100000}\n"
        f"  max_in_flight: {POOL // 2}\n"  # what an operator sets: half the pool at most
        "  statement_timeout_seconds: 5\n"
    )
    (d / "calm.yaml").write_text(
        "service: calm\n"
        f"identity: {{tokens: ['{hash_token('calm-token')}']}}\n"
        "grants:\n"
        "  - collections: [calm]\n"
        "    operations: [read, list, count, create, update, delete]\n"
        "limits:\n"
        "  rate: {per_second: 100000, burst: 100000}\n"
    )
    return d


@dataclass
class Latencies:
    took: list[float] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.took:
            return "no requests"
        q = statistics.quantiles(self.took, n=100) if len(self.took) > 1 else self.took * 99
        return (
            f"{len(self.took)} calm requests, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms,"
            f" max {max(self.took) * 1000:.1f} ms, failures {self.failures[:5]}"
            f" ({len(self.failures)})"
        )


async def request(
    s: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any]:
    async with s.request(method, url, headers=headers, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def calm_traffic(s: aiohttp.ClientSession, base: str, until: float) -> Latencies:
    seen = Latencies()
    while time.monotonic() < until:
        for method, path in (("GET", "/api/db/calm/c1"), ("GET", "/api/db/calm?limit=5")):
            started = time.monotonic()
            status, body = await request(s, method, base + path, CALM)
            seen.took.append(time.monotonic() - started)
            if status != 200:
                seen.failures.append((status, body.get("error", {}).get("code", "")))
        await asyncio.sleep(0.01)
    return seen


async def slow_queries(s: aiohttp.ClientSession, base: str, until: float) -> dict[int, int]:
    statuses: dict[int, int] = {}

    async def one() -> None:
        while time.monotonic() < until:
            status, _ = await request(
                s, "POST", f"{base}/api/db/slow/query", FLOOD, json={"filter": SLOW_FILTER}
            )
            statuses[status] = statuses.get(status, 0) + 1
            if status == 429:
                await asyncio.sleep(0.005)

    await asyncio.gather(*(one() for _ in range(4 * POOL)))
    return statuses


async def open_transactions(s: aiohttp.ClientSession, base: str, until: float) -> int:
    """Begin as many transactions as the sidecar allows (one after another, until one is
    refused) and keep them busy until ``until``."""
    opened: list[str] = []
    for _ in range(2 * POOL):
        status, body = await request(
            s, "POST", f"{base}/api/db/transaction", FLOOD, json={"action": "begin"}
        )
        if status != 201:
            break
        opened.append(body["transaction_id"])

    async def keep_busy(tid: str) -> None:
        while time.monotonic() < until:
            await request(
                s, "GET", f"{base}/api/db/flood_t?limit=1", {**FLOOD, "X-Transaction-Id": tid}
            )
            await asyncio.sleep(0.2)
        await request(
            s,
            "POST",
            f"{base}/api/db/transaction",
            FLOOD,
            json={"action": "rollback", "transaction_id": tid},
        )

    await asyncio.gather(*(keep_busy(t) for t in opened))
    return len(opened)


@dataclass
class Setup:
    server: Server
    cluster: PgCluster


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    missing = binaries_missing()
    if missing is not None:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("saturation")
    with private_cluster() as cluster:
        config = tmp / "dbproxy.yaml"
        config.write_text(
            "databases:\n"
            "  - name: main\n"
            "    type: postgresql\n"
            f"    connection_string: {cluster.dsn()}\n"
            f"    pool_settings: {{min_connections: 2, max_connections: {POOL}, "
            f"timeout_seconds: {POOL_TIMEOUT}}}\n"
        )
        server = start_server(
            ["--config", str(config), "--policies", str(policies(tmp))],
            tmp,
            {"DBPROXY_LOG_LEVEL": "WARNING"},
        )
        try:
            asyncio.run(seed(server, cluster))
            yield Setup(server, cluster)
        finally:
            server.stop()


async def seed(server: Server, cluster: PgCluster) -> None:
    async with aiohttp.ClientSession() as s:
        for coll, headers in (("slow", FLOOD), ("flood_t", FLOOD), ("calm", CALM)):
            status, _ = await request(
                s, "POST", f"{server.url}/api/db/{coll}", headers, json={"_id": "c1", "s": "x"}
            )
            assert status == 201
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(
            "INSERT INTO dbproxy.slow (_id, doc, _version) SELECT g::text, "
            "jsonb_build_object('_id', g::text, 's', repeat('ab', 100), '_version', 1), 1 "
            f"FROM generate_series(1, {SLOW_ROWS}) g"
        )
        await conn.execute("ANALYZE dbproxy.slow")
    finally:
        await conn.close()


async def baseline_and_flood(server: Server, flood: Any) -> tuple[Latencies, Latencies, Any]:
    async with aiohttp.ClientSession() as s:
        before = await calm_traffic(s, server.url, time.monotonic() + 0.5)
        until = time.monotonic() + FLOOD_SECONDS
        flooded = asyncio.create_task(flood(s, server.url, until))
        await asyncio.sleep(0.3)  # let the flood take the pool
        during = await calm_traffic(s, server.url, until)
        return before, during, await flooded


def test_slow_queries_of_one_service_leave_the_other_its_latency(setup: Setup) -> None:
    before, during, statuses = asyncio.run(baseline_and_flood(setup.server, slow_queries))
    assert statuses.get(200, 0) >= POOL // 2, statuses  # the flood did run slow queries
    assert not [s for s in statuses if s >= 500], statuses  # ... and got no 5xx either
    assert before.failures == [], before.summary()
    assert during.failures == [], during.summary()
    assert max(during.took) < CALM_MAX_LATENCY, f"{during.summary()} (before: {before.summary()})"
    print(
        f"slow-query flood {statuses}; calm before: {before.summary()}; during: {during.summary()}"
    )


def test_open_transactions_of_one_service_leave_the_other_its_connections(setup: Setup) -> None:
    before, during, opened = asyncio.run(baseline_and_flood(setup.server, open_transactions))
    assert opened >= 1
    assert before.failures == [], before.summary()
    print(f"flood opened {opened} transactions; calm during: {during.summary()}")
    assert during.failures == [], f"{during.summary()}; flood opened {opened} transactions"
    assert max(during.took) < CALM_MAX_LATENCY, during.summary()
