"""The MongoDB backend's own behaviour beyond the shared suites: the filter compiler's output,
the breaker and health against a server that goes away, error codes, the audit log."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from proxy.backends.mongo import MongoBackend, database_of
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.errors import Unavailable
from proxy.query import mongo as mq
from proxy.query.parse import parse_filter, parse_update
from proxy.query.spec import AuditScope, Modify
from proxy.resilience.breaker import BreakerState
from tests import mongo_server
from tests.backends import open_backend

pytestmark = pytest.mark.integration


def test_filters_compile_to_plain_mongodb_documents() -> None:
    limits = Limits()
    flt = parse_filter(
        {"age": {"$gt": 3}, "items": {"$elemMatch": {"sku": "x", "qty": {"$gte": 2}}}}, limits
    )
    assert mq.compile_filter(flt) == {
        "age": {"$gt": 3},
        "items": {"$elemMatch": {"sku": {"$eq": "x"}, "qty": {"$gte": 2}}},
    }
    # a value that looks like an operator stays a value
    flt = parse_filter({"a": {"$eq": {"x": 1}}}, limits)
    assert mq.compile_filter(flt) == {"a": {"$eq": {"x": 1}}}
    upd = parse_update({"$set": {"a.b": 1}, "$push": {"l": 2}, "$pull": {"m": {"k": 1}}}, limits)
    assert mq.compile_update(upd) == {
        "$set": {"a.b": 1},
        "$push": {"l": {"$each": [2]}},
        "$pull": {"m": {"$in": [{"k": 1}]}},
        "$inc": {"_version": 1},
    }


def test_database_of_url() -> None:
    assert database_of("mongodb://h:1/shop?replicaSet=r") == "shop"
    assert database_of("mongodb://h:1/") == "dbproxy"


async def test_audit_log_records_writes_in_order(tmp_path: Any, pg_dsn: str) -> None:
    async with open_backend("mongodb", pg_dsn, Limits(), str(tmp_path)) as backend:
        await backend.insert_one("a", {"_id": "x"})
        await backend.change("a", "x", Modify(parse_update({"$set": {"n": 1}}, Limits())))
        await backend.delete("a", "x")
        await backend.insert_one("b", {"_id": "y"})
        rows = await backend.audit_log()
        assert [(r["operation"], r["collection"], r["ids"]) for r in rows] == [
            ("create", "a", ["x"]),
            ("update", "a", ["x"]),
            ("delete", "a", ["x"]),
            ("create", "b", ["y"]),
        ]
        assert rows == sorted(rows, key=lambda r: r["id"])
        later = await backend.audit_log(after_id=rows[1]["id"], limit=1)
        assert [r["operation"] for r in later] == ["delete"]
        scoped = await backend.audit_log(scope=AuditScope(("b",), (), "svc"))
        assert [r["collection"] for r in scoped] == ["b"]
        globbed = await backend.audit_log(scope=AuditScope((), ("[a]",), "svc"))
        assert {r["collection"] for r in globbed} == {"a"}


@pytest.fixture
def private_server() -> Iterator[Any]:
    from secantus.server import SecantusDBServer

    path = tempfile.mkdtemp(prefix="dbproxy-secantus-own-")
    server = SecantusDBServer(
        host="127.0.0.1", port=0, storage_path=path, replica_set_name="secantus"
    )
    server.start()
    try:
        with mongo_server.driver_sockets_collected():  # the driver's, to the stopped server
            yield server
    finally:
        server.stop()
        shutil.rmtree(path, ignore_errors=True)


async def test_breaker_opens_when_the_server_goes_away(private_server: Any) -> None:
    if mongo_server.server_name() != "secantus":
        pytest.skip("needs a server this test may stop")
    cfg = DatabaseConfig(
        name="m",
        type="mongodb",
        connection_string=str(private_server.uri),
        pool_settings=PoolSettings(min_connections=0, max_connections=4, timeout_seconds=0.3),
    )
    backend = MongoBackend(cfg, Limits(), database="breaker")
    await backend.start()
    try:
        await backend.insert_one("c", {"_id": "a"})
        assert (await backend.health())["status"] == "up"
        private_server.stop()
        fast = []
        started = time.monotonic()
        for _ in range(8):
            with pytest.raises(Unavailable) as info:
                await backend.get("c", "a")
            assert info.value.code == "database_unavailable" and info.value.retry_after
            fast.append("circuit breaker" in info.value.message)
        assert fast[:5] == [False] * 5 and fast[5:] == [True] * 3  # open after 5 failures
        assert backend.breaker.state is BreakerState.OPEN
        assert time.monotonic() - started < 8 * 0.3 + 3
        health = await backend.health()
        assert health["status"] == "down" and health["error"] == "database_unavailable"
    finally:
        await backend.close()


def test_the_test_server_started_quickly() -> None:
    mongo_server.mongo_url()
    if mongo_server.STARTED_IN:  # the session's SecantusDB server (none with MONGODB_URL)
        print(f"secantus started in {mongo_server.STARTED_IN[0]:.2f}s")
        assert mongo_server.STARTED_IN[0] < 30


async def test_concurrent_reads_by_id_share_one_find(tmp_path: Any, pg_dsn: str) -> None:
    """64 concurrent reads of one collection (some ids missing, some twice) reach the server
    as a handful of finds, each caller getting its own document (or None)."""
    import asyncio

    from pymongo import AsyncMongoClient

    async with open_backend("mongodb", pg_dsn, Limits(), str(tmp_path)) as backend:
        assert backend.capabilities.coalesce
        for i in range(40):
            await backend.insert_one("pts", {"_id": f"p{i}", "n": i})
        admin: AsyncMongoClient[Any] = AsyncMongoClient(mongo_server.mongo_url())
        try:
            before = (await admin.admin.command("serverStatus"))["opcounters"]["query"]
            ids = [f"p{i % 48}" for i in range(64)]  # p40..p47 do not exist
            got = await asyncio.gather(*(backend.get("pts", i) for i in ids))
            after = (await admin.admin.command("serverStatus"))["opcounters"]["query"]
        finally:
            await admin.close()
        for doc_id, result in zip(ids, got, strict=True):
            n = int(doc_id[1:])
            if n >= 40:
                assert result is None
            else:
                assert result is not None and result.version == 1
                assert orjson.loads(result.body) == {"_id": doc_id, "n": n, "_version": 1}
        assert 1 <= after - before <= 4, after - before
