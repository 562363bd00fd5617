"""Transactions, optimistic concurrency and idempotency over HTTP against `dbproxy serve`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import Server
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e


def coll() -> str:
    return "tx_" + uuid.uuid4().hex[:8]


async def call(s: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.copy()


async def test_fifty_concurrent_puts_with_same_etag_one_wins(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        st, _doc, _ = await call(s, "POST", base, json={"_id": "acct", "balance": 100})
        assert st == 201
        results = await asyncio.gather(
            *(
                call(
                    s,
                    "PUT",
                    f"{base}/acct",
                    json={"$inc": {"balance": -i}},
                    headers={"If-Match": '"1"'},
                )
                for i in range(1, 51)
            )
        )
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 1 and statuses.count(412) == 49
        winner = next(r for r in results if r[0] == 200)
        st, final, h = await call(s, "GET", f"{base}/acct")
        assert final["_version"] == 2 and final["balance"] == winner[1]["balance"]
        assert h["ETag"] == '"2"'
        # If-None-Match-like create: a second create with the same _id is 409, not overwrite
        st, err, _ = await call(s, "POST", base, json={"_id": "acct", "balance": 0})
        assert st == 409 and err["error"]["code"] == "duplicate_id"


async def test_idempotent_create_retry_returns_same_document(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    key = {"Idempotency-Key": "order-42"}
    async with aiohttp.ClientSession() as s:
        first = await call(s, "POST", base, json={"amount": 5}, headers=key)
        again = await call(s, "POST", base, json={"amount": 5}, headers=key)
        assert first[0] == again[0] == 201
        assert first[1]["_id"] == again[1]["_id"]
        assert again[2]["Idempotent-Replayed"] == "true" and again[2]["ETag"] == '"1"'
        st, count, _ = await call(s, "GET", f"{base}/count")
        assert count == {"count": 1}
        st, err, _ = await call(s, "POST", base, json={"amount": 6}, headers=key)
        assert st == 422 and err["error"]["code"] == "idempotency_key_reused"
        # an idempotent batch runs once too
        batch = {
            "operations": [
                {"op": "create", "collection": base.rsplit("/", 1)[1], "document": {"amount": 1}}
            ]
        }
        hdr = {"Idempotency-Key": "batch-1"}
        b1 = await call(s, "POST", f"{pg_server.url}/api/db/transaction", json=batch, headers=hdr)
        b2 = await call(s, "POST", f"{pg_server.url}/api/db/transaction", json=batch, headers=hdr)
        assert b1[0] == b2[0] == 200 and b1[1] == b2[1]
        st, count, _ = await call(s, "GET", f"{base}/count")
        assert count == {"count": 2}


async def test_batch_failure_names_operation_and_keeps_nothing(pg_server: Server) -> None:
    name = coll()
    url = f"{pg_server.url}/api/db/transaction"
    async with aiohttp.ClientSession() as s:
        st, body, _ = await call(
            s,
            "POST",
            url,
            json={
                "operations": [
                    {"op": "create", "collection": name, "document": {"_id": "a"}},
                    {"op": "create", "collection": name, "document": {"_id": "b"}},
                    {"op": "create", "collection": name, "document": {"_id": "a"}},
                ]
            },
        )
        assert st == 409 and body["error"]["code"] == "duplicate_id"
        assert body["error"]["details"]["operation"] == 2
        st, count, _ = await call(s, "GET", f"{pg_server.url}/api/db/{name}/count")
        assert count == {"count": 0}


async def test_interactive_flow_over_http(pg_server: Server) -> None:
    name = coll()
    tx_url = f"{pg_server.url}/api/db/transaction"
    base = f"{pg_server.url}/api/db/{name}"
    async with aiohttp.ClientSession() as s:
        st, begun, _ = await call(
            s, "POST", tx_url, json={"action": "begin", "isolation": "repeatable_read"}
        )
        assert st == 201 and len(begun["transaction_id"]) >= 32
        hdr = {"X-Transaction-Id": begun["transaction_id"]}
        st, doc, _ = await call(s, "POST", base, json={"_id": "t1", "n": 1}, headers=hdr)
        assert st == 201
        st, _, _ = await call(s, "PUT", f"{base}/t1", json={"$inc": {"n": 1}}, headers=hdr)
        assert st == 200
        st, page, _ = await call(s, "GET", base, headers=hdr)
        assert [d["n"] for d in page["items"]] == [2]
        st, _outside, _ = await call(s, "GET", f"{base}/t1")
        assert st == 404  # invisible until commit
        st, done, _ = await call(
            s, "POST", tx_url, json={"action": "commit", "transaction_id": begun["transaction_id"]}
        )
        assert st == 200 and done["status"] == "committed"
        st, doc, _ = await call(s, "GET", f"{base}/t1")
        assert st == 200 and doc["n"] == 2
        st, err, _ = await call(s, "GET", f"{base}/t1", headers=hdr)
        assert st == 409 and err["error"]["code"] == "transaction_closed"
        st, err, _ = await call(s, "GET", f"{base}/t1", headers={"X-Transaction-Id": "nope"})
        assert st == 404 and err["error"]["code"] == "transaction_not_found"


async def test_client_disconnect_mid_transaction_leaves_nothing(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "limits: {transaction_idle_timeout_seconds: 0.5}\n"
        f"databases:\n  - name: main\n    type: postgresql\n    connection_string: {pg_dsn}\n"
    )
    server = launch("--config", str(cfg))
    name = coll()
    async with aiohttp.ClientSession() as s:
        await call(s, "POST", f"{server.url}/api/db/{name}", json={"_id": "row", "n": 0})
        st, begun, _ = await call(
            s, "POST", f"{server.url}/api/db/transaction", json={"action": "begin"}
        )
        hdr = {"X-Transaction-Id": begun["transaction_id"]}
        st, _, _ = await call(
            s, "PUT", f"{server.url}/api/db/{name}/row", json={"$inc": {"n": 1}}, headers=hdr
        )
        assert st == 200
    # the client is gone (session closed) without commit or rollback
    conn = await asyncpg.connect(pg_dsn)
    try:
        for _ in range(50):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbproxy' "
                "AND state = 'idle in transaction' AND datname = current_database()"
            )
            if left == 0:
                break
            await asyncio.sleep(0.1)
        assert left == 0
        # no lock left: a plain write on the same row goes through at once
        async with aiohttp.ClientSession() as s:
            st, doc, _ = await call(
                s, "PUT", f"{server.url}/api/db/{name}/row", json={"$inc": {"n": 10}}
            )
            assert st == 200 and doc["n"] == 10
    finally:
        await conn.close()


async def test_commit_outcome_unknown_when_connection_dies_during_commit(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    try:
        dsn = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(
            f"databases:\n  - name: main\n    type: postgresql\n    connection_string: {dsn}\n"
            "    pool_settings: {min_connections: 1, max_connections: 2, timeout_seconds: 5}\n"
        )
        # start it off the loop: the proxy lives on this loop and must keep serving
        server = await asyncio.to_thread(launch, "--config", str(cfg))
        name = coll()
        tx_url = f"{server.url}/api/db/transaction"
        async with aiohttp.ClientSession() as s:
            for _ in range(50):
                st, _, _ = await call(s, "GET", f"{server.url}/api/db/health")
                if st == 200:
                    break
                await asyncio.sleep(0.2)
            st, _, _ = await call(s, "POST", f"{server.url}/api/db/{name}", json={"_id": "seed"})
            assert st == 201
            st, begun, _ = await call(s, "POST", tx_url, json={"action": "begin"})
            hdr = {"X-Transaction-Id": begun["transaction_id"]}
            st, _, _ = await call(
                s, "POST", f"{server.url}/api/db/{name}", json={"_id": "maybe"}, headers=hdr
            )
            assert st == 201
            proxy.cut_after = b"COMMIT"
            st, err, _ = await call(
                s,
                "POST",
                tx_url,
                json={"action": "commit", "transaction_id": begun["transaction_id"]},
            )
            assert proxy.cuts == 1
            assert st == 502 and err["error"]["code"] == "commit_outcome_unknown"
            # the sidecar recovers: new connections through the proxy work again
            for _ in range(20):
                st, _doc, _ = await call(s, "GET", f"{server.url}/api/db/{name}/maybe")
                if st in (200, 404):
                    break
                await asyncio.sleep(0.1)
            assert st == 200  # here the COMMIT did reach the server before the cut
    finally:
        await proxy.stop()


async def test_if_none_match_creates_only(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    hdr = {"If-None-Match": "*"}
    async with aiohttp.ClientSession() as s:
        st, doc, _ = await call(s, "PUT", f"{base}/once", json={"v": 1}, headers=hdr)
        assert st == 201 and doc == {"_id": "once", "v": 1, "_version": 1}
        st, err, _ = await call(s, "PUT", f"{base}/once", json={"v": 2}, headers=hdr)
        assert st == 412 and err["error"]["code"] == "already_exists"
        st, doc, _ = await call(s, "GET", f"{base}/once")
        assert doc["v"] == 1
        st, err, _ = await call(
            s, "PUT", f"{base}/x", json={"v": 2}, headers={"If-None-Match": '"3"'}
        )
        assert st == 400 and err["error"]["code"] == "invalid_if_none_match"
