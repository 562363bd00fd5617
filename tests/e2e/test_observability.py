"""Observability end to end: stats match a scripted workload, /metrics parses and has the
families operators need, slow queries carry their plan, monitoring needs `monitor`."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
FAMILIES = {
    "dbproxy_request_duration_seconds",
    "dbproxy_errors",
    "dbproxy_pool_size",
    "dbproxy_pool_in_use",
    "dbproxy_pool_waiting",
    "dbproxy_breaker_state",
    "dbproxy_replica_lag_seconds",
    "dbproxy_cache_events",
    "dbproxy_rate_limited",
    "dbproxy_transactions",
    "dbproxy_transactions_open",
}


async def test_stats_match_a_scripted_workload(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "limits: {slow_query_ms: 50}\n"
        f"databases:\n  - name: main\n    type: postgresql\n    connection_string: {pg_dsn}\n"
    )
    server = launch("--config", str(cfg))
    name = "obs_" + uuid.uuid4().hex[:8]
    base = f"{server.url}/api/db/{name}"
    async with aiohttp.ClientSession() as s:
        for i in range(7):
            async with s.post(base, json={"_id": f"d{i}", "n": i}) as r:
                assert r.status == 201
        for i in range(3):
            async with s.get(f"{base}/d{i}") as r:
                assert r.status == 200
        for _ in range(2):
            async with s.get(f"{base}/missing") as r:
                assert r.status == 404
        for n in (1, 2, 3, 4):  # one shape, four values: one pattern
            async with s.get(base, params={"filter": json.dumps({"n": {"$gte": n}})}) as r:
                assert r.status == 200
        async with s.get(f"{base}/count") as r:
            assert (await r.json()) == {"count": 7}
        # a slow query: a regex scan over many rows
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                f'INSERT INTO dbproxy."{name}" (_id, doc) SELECT g::text, '
                "jsonb_build_object('_id', g::text, 's', repeat('ab', 100)) "
                "FROM generate_series(1, 60000) g"
            )
        finally:
            await conn.close()
        slow_filter = json.dumps({"s": {"$regex": "(a|b)*c$"}})
        async with s.get(f"{base}/count", params={"filter": slow_filter}) as r:
            assert r.status == 200
        await asyncio.sleep(1.0)  # the sampled EXPLAIN runs in the background

        async with s.get(f"{server.url}/api/db/performance") as r:
            perf = await r.json()
        async with s.get(f"{server.url}/api/db/stats") as r:
            stats = await r.json()
        async with s.get(f"{server.url}/metrics") as r:
            metrics_text = await r.text()

    ops = {(o["operation"], o["collection"]): o for o in perf["operations"]}
    assert ops[("insert", name)]["calls"] == 7
    assert ops[("get", name)]["calls"] == 5 and ops[("get", name)]["errors"] == 2
    assert ops[("find", name)]["calls"] == 4
    assert ops[("count", name)]["calls"] == 2
    patterns = [
        p for p in perf["top_patterns"] if p["collection"] == name and p["operation"] == "find"
    ]
    assert len(patterns) == 1 and patterns[0]["calls"] == 4  # values stripped: one shape
    assert "$gte" in patterns[0]["pattern"] and "1" not in patterns[0]["pattern"].split()[-1]
    slow = [q for q in perf["slow_queries"] if q["collection"] == name]
    assert slow and slow[0]["execution_time_ms"] >= 50
    assert slow[0]["index_used"] is False and "Seq Scan" in (slow[0]["plan"] or "")
    counts = stats["requests"]["collections"][name]
    assert counts["get"]["errors_by_code"] == {"not_found": 2}
    assert stats["databases"]["main"][name]["table_bytes"] > 0

    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    assert set(families) >= FAMILIES, FAMILIES - set(families)
    inserts = [
        smp
        for smp in families["dbproxy_request_duration_seconds"].samples
        if smp.name.endswith("_count")
        and smp.labels.get("collection") == name
        and smp.labels.get("operation") == "insert"
    ]
    assert inserts and inserts[0].value == 7
    errors = {
        smp.labels["code"]: smp.value
        for smp in families["dbproxy_errors"].samples
        if smp.name.endswith("_total")
    }
    assert errors.get("not_found", 0) >= 2
    for smp in families["dbproxy_request_duration_seconds"].samples:  # bounded labels only
        assert set(smp.labels) <= {"operation", "collection", "status", "le"}


async def test_monitoring_needs_the_monitor_permission(
    launch: Callable[..., Server], pg_dsn: str
) -> None:
    policies = Path(__file__).resolve().parents[2] / "policies"
    server = launch("--database", pg_dsn, "--policies", str(policies))
    async with aiohttp.ClientSession() as s:
        for path in ("stats", "performance", "connections", "audit"):
            url = f"{server.url}/api/db/{path}"
            async with s.get(url, headers={"Authorization": "Bearer billing-dev-token"}) as r:
                body: Any = await r.json()
                assert r.status == 403 and body["error"]["code"] == "permission_denied"
            async with s.get(url, headers={"Authorization": "Bearer analytics-dev-token"}) as r:
                assert r.status == 200, await r.text()
        async with s.get(f"{server.url}/metrics") as r:  # scraping needs no token
            assert r.status == 200
