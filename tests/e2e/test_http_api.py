"""End to end: the real ``dbproxy serve`` process over HTTP, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


def coll() -> str:
    return "e2e_" + uuid.uuid4().hex[:8]


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kw) as resp:
        body = await resp.read()
        data = json.loads(body) if body else None
        return resp.status, data, resp.headers.copy()


def assert_error(status: int, data: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, data
    assert data["error"]["code"] == code, data
    assert data["error"]["request_id"] and data["error"]["message"]


async def test_document_lifecycle(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        st, created, h = await call(s, "POST", base, json={"name": "ann", "age": 31})
        assert st == 201 and h["ETag"] == '"1"' and created["_version"] == 1
        doc_id = created["_id"]
        st, got, h = await call(s, "GET", f"{base}/{doc_id}")
        assert st == 200 and got == created and h["ETag"] == '"1"'

        st, got, h = await call(s, "PUT", f"{base}/{doc_id}", json={"$inc": {"age": 1}})
        assert st == 200 and got["age"] == 32 and h["ETag"] == '"2"'
        st, got, _ = await call(s, "PATCH", f"{base}/{doc_id}", json={"city": "Oslo", "age": None})
        assert st == 200 and got == {"_id": doc_id, "name": "ann", "city": "Oslo", "_version": 3}
        st, data, _ = await call(
            s, "PUT", f"{base}/{doc_id}", json={"x": 1}, headers={"If-Match": '"2"'}
        )
        assert_error(st, data, 412, "version_mismatch")
        st, got, _ = await call(
            s, "PUT", f"{base}/{doc_id}", json={"x": 1}, headers={"If-Match": '"3"'}
        )
        assert st == 200 and got == {"_id": doc_id, "x": 1, "_version": 4}

        st, got, _ = await call(s, "PUT", f"{base}/new1?upsert=true", json={"y": 2})
        assert st == 201 and got["_id"] == "new1"

        st, data, _ = await call(s, "DELETE", f"{base}/{doc_id}")
        assert st == 200 and data == {"deleted": True, "_id": doc_id, "_version": 4}
        st, data, _ = await call(s, "GET", f"{base}/{doc_id}")
        assert_error(st, data, 404, "not_found")


async def test_list_query_count_and_pagination(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    docs = [
        {"_id": f"d{i:02d}", "n": i, "even": i % 2 == 0, "tags": ["t", f"x{i}"]} for i in range(25)
    ]
    async with aiohttp.ClientSession() as s:
        st, data, _ = await call(s, "POST", base, json=docs)
        assert st == 201 and data["created"] == 25
        st, data, _ = await call(
            s,
            "GET",
            base,
            params={
                "filter": json.dumps({"even": True, "n": {"$gte": 10}}),
                "sort": "-n",
                "limit": "3",
                "fields": "n",
            },
        )
        assert st == 200
        assert data["items"] == [{"_id": f"d{n}", "_version": 1, "n": n} for n in (24, 22, 20)]
        assert data["next"]
        st, data2, _ = await call(
            s,
            "POST",
            f"{base}/query",
            json={
                "filter": {"even": True, "n": {"$gte": 10}},
                "sort": "-n",
                "limit": 3,
                "fields": "n",
                "next": data["next"],
            },
        )
        assert [d["n"] for d in data2["items"]] == [18, 16, 14]
        st, data, _ = await call(
            s, "GET", f"{base}/count", params={"filter": json.dumps({"tags": "t"})}
        )
        assert st == 200 and data == {"count": 25}
        # walk every page with the cursor: all 25, in order, no repeats
        seen: list[str] = []
        nxt = None
        for _ in range(10):
            params = {"limit": "7"} | ({"next": nxt} if nxt else {})
            st, page, _ = await call(s, "GET", base, params=params)
            seen += [d["_id"] for d in page["items"]]
            nxt = page["next"]
            if not nxt:
                break
        assert seen == [d["_id"] for d in docs]


async def test_bulk_create_partial_failure(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        st, data, _ = await call(s, "POST", base, json=[{"_id": "a"}, {"_id": "a"}, "nope"])
        assert st == 207
        assert [i["status"] for i in data["items"]] == [201, 409, 400]
        assert data["items"][1]["error"]["code"] == "duplicate_id"
        st, data, _ = await call(s, "GET", f"{base}/count")
        assert data == {"count": 1}


async def test_bad_input_gets_stable_codes(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    deep: Any = 1
    for _ in range(40):
        deep = {"a": deep}
    async with aiohttp.ClientSession() as s:
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            (
                "POST",
                base,
                {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
                400,
                "invalid_json",
            ),
            ("POST", base, {"json": deep}, 400, "too_deep"),
            (
                "POST",
                base,
                {"data": io.BytesIO(b'{"a":"' + b"x" * (1024 * 1024 + 10) + b'"}')},
                413,
                "payload_too_large",
            ),
            ("POST", f"{pg_server.url}/api/db/1bad", {"json": {}}, 400, "invalid_collection_name"),
            ("GET", base, {"params": {"filter": '{"$where": "1"}'}}, 400, "forbidden_operator"),
            ("GET", base, {"params": {"limit": "5000"}}, 400, "limit_too_large"),
            ("GET", base, {"params": {"limit": "abc"}}, 400, "invalid_parameter"),
            ("GET", base, {"params": {"next": "zzz"}}, 400, "invalid_cursor"),
            ("GET", base, {"params": {"frobnicate": "1"}}, 400, "unknown_parameter"),
            (
                "PUT",
                f"{base}/x",
                {"json": {"a": 1}, "headers": {"If-Match": "nope"}},
                400,
                "invalid_if_match",
            ),
            ("PUT", f"{base}/x?upsert=maybe", {"json": {"a": 1}}, 400, "invalid_parameter"),
            ("POST", base, {"data": b""}, 400, "missing_body"),
            ("GET", f"{pg_server.url}/nowhere", {}, 404, "no_such_endpoint"),
            ("DELETE", base, {}, 405, "method_not_allowed"),
        ]
        for method, url, kw, status, code in cases:
            st, data, headers = await call(s, method, url, **kw)
            assert_error(st, data, status, code)
            assert headers["X-Request-Id"] == data["error"]["request_id"]


async def test_request_id_is_echoed(pg_server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        st, data, headers = await call(
            s, "GET", f"{pg_server.url}/api/db/c/missing", headers={"X-Request-Id": "trace-123"}
        )
        assert st == 404 and data["error"]["request_id"] == "trace-123"
        assert headers["X-Request-Id"] == "trace-123"


async def test_health(pg_server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        st, data, _ = await call(s, "GET", f"{pg_server.url}/api/db/health")
        assert st == 200 and data["status"] == "ready"
        assert data["databases"]["default"]["status"] == "up"


async def test_unreachable_database_is_503_not_a_crash(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "databases:\n  - name: main\n    type: postgresql\n"
        "    connection_string: postgresql://postgres:s3cret@127.0.0.1:1/none\n"
    )
    server = launch("--config", str(cfg))
    async with aiohttp.ClientSession() as s:
        st, data, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert st == 503 and data["databases"]["main"]["status"] == "down"
        st, data, headers = await call(s, "GET", f"{server.url}/api/db/c/x")
        assert_error(st, data, 503, "database_unavailable")
        assert int(headers["Retry-After"]) >= 1
    assert "s3cret" not in server.output()


async def test_statement_timeout_is_504_and_connection_survives(
    launch: Callable[..., Server], pg_dsn: str, tmp_path: Path
) -> None:
    name = coll()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "limits: {statement_timeout_seconds: 0.2}\n"
        "databases:\n  - name: main\n    type: postgresql\n"
        f"    connection_string: {pg_dsn}\n"
        "    pool_settings: {min_connections: 1, max_connections: 1, timeout_seconds: 5}\n"
    )
    server = launch("--config", str(cfg))
    base = f"{server.url}/api/db/{name}"
    async with aiohttp.ClientSession() as s:
        st, _, _ = await call(s, "POST", base, json={"_id": "seed"})
        assert st == 201
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                f'INSERT INTO dbproxy."{name}" (_id, doc) SELECT g::text, '
                "jsonb_build_object('_id', g::text, 's', repeat('ab', 200)) "
                "FROM generate_series(1, 200000) g"
            )
        finally:
            await conn.close()
        st, data, _ = await call(
            s, "GET", f"{base}/count", params={"filter": json.dumps({"s": {"$regex": "(a|b)*c$"}})}
        )
        assert_error(st, data, 504, "statement_timeout")
        # the single pooled connection is still usable
        st, data, _ = await call(s, "GET", f"{base}/seed")
        assert st == 200 and data["_id"] == "seed"


async def test_sigterm_finishes_in_flight_requests(pg_server: Server) -> None:
    base = f"{pg_server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        writes = [asyncio.create_task(call(s, "POST", base, json={"i": i})) for i in range(50)]
        await asyncio.sleep(0.05)
        code = await asyncio.to_thread(pg_server.stop)
        results = await asyncio.gather(*writes, return_exceptions=True)
    assert code == 0, pg_server.output()
    done = [r for r in results if not isinstance(r, BaseException)]
    # every request that got an answer got a real one; none was cut off with a 5xx
    assert all(r[0] == 201 for r in done)
    assert "stopped" in pg_server.output()


async def test_workers_share_the_port_and_stop_together(
    launch: Callable[..., Server], pg_dsn: str
) -> None:
    server = launch("--database", pg_dsn, "--workers", "2", "--no-metrics")
    base = f"{server.url}/api/db/{coll()}"
    async with aiohttp.ClientSession() as s:
        for i in range(40):  # new connections spread over both processes
            async with aiohttp.ClientSession() as fresh, fresh.post(base, json={"i": i}) as r:
                assert r.status == 201
        st, data, _ = await call(s, "GET", f"{base}/count")
        assert data == {"count": 40}
        st, _, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert st == 200
    children = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    assert len(children) == 2
    assert server.stop() == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
