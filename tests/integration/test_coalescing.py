"""Coalesced point reads: one query for concurrent gets, results and policies per request."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.config import Config, DatabaseConfig, Limits, PoolSettings
from proxy.errors import NotFound
from proxy.pipeline.core import Core
from proxy.pipeline.gate import Caller, Gatekeeper
from proxy.policy import load_policies

pytestmark = pytest.mark.integration
POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
async def backend(pg_dsn: str):  # type: ignore[no-untyped-def]
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=pg_dsn,
        pool_settings=PoolSettings(1, 4, 5),
    )
    b = PostgresBackend(cfg, Limits(), schema=f"co_{uuid.uuid4().hex[:10]}")
    await b.start()
    yield b
    async with b._conn() as conn:
        await conn.execute(f'DROP SCHEMA "{b.schema}" CASCADE')
    await b.close()


async def test_concurrent_gets_share_queries(backend: PostgresBackend) -> None:
    core = Core(Config(), {"main": backend}, "main")
    await core.create("c", [{"_id": f"d{i}", "n": i} for i in range(50)])
    ids = [f"d{i % 50}" for i in range(200)] + ["missing"] * 5
    results = await asyncio.gather(*(core.get("c", i) for i in ids), return_exceptions=True)
    for doc_id, result in zip(ids, results, strict=True):
        if doc_id == "missing":
            assert isinstance(result, NotFound)
        else:
            assert not isinstance(result, BaseException)
            assert orjson.loads(result.body)["_id"] == doc_id
    stats = backend.coalescing()
    assert stats["reads"] == len(ids)
    assert stats["batches"] <= 5  # 205 reads, a handful of statements
    # switched off: one statement per read
    backend.coalesce = False
    before = backend.endpoints.primary.statements
    await asyncio.gather(*(core.get("c", f"d{i}") for i in range(20)))
    assert backend.endpoints.primary.statements - before == 20


async def test_policies_still_hold_per_request(backend: PostgresBackend) -> None:
    policies = load_policies(POLICIES)
    core = Core(Config(), {"main": backend}, "main", Gatekeeper(policies))
    await core.create(
        "users",
        [
            {"_id": "u1", "tenant_id": "t1", "name": "a", "password_hash": "x"},
            {"_id": "u2", "tenant_id": "t2", "name": "b", "password_hash": "y"},
        ],
    )
    billing = policies.get("billing")
    assert billing is not None
    t1 = Caller("billing", billing, {"X-Tenant-Id": "t1"})
    t2 = Caller("billing", billing, {"X-Tenant-Id": "t2"})
    results = await asyncio.gather(
        core.get("users", "u1", caller=t1),
        core.get("users", "u2", caller=t1),
        core.get("users", "u1", caller=t2),
        core.get("users", "u2", caller=t2),
        core.get("users", "u1"),
        return_exceptions=True,
    )
    assert orjson.loads(results[0].body) == {
        "_id": "u1",
        "_version": 1,
        "tenant_id": "t1",
        "name": "a",
    }
    assert isinstance(results[1], NotFound) and isinstance(results[2], NotFound)
    assert orjson.loads(results[3].body)["_id"] == "u2"
    assert "password_hash" not in orjson.loads(results[3].body)
    assert orjson.loads(results[4].body)["password_hash"] == "x"  # open caller sees all


async def test_concurrent_creates_share_a_statement_with_per_item_outcomes(
    backend: PostgresBackend,
) -> None:
    from proxy import context
    from proxy.context import RequestContext
    from proxy.errors import DuplicateId, InvalidQuery

    core = Core(Config(), {"main": backend}, "main")
    await core.create("w", {"_id": "taken"})

    async def create(i: int) -> object:
        context.current.set(RequestContext(f"svc{i % 3}", f"req-{i}"))
        doc: dict[str, object] = {"_id": f"n{i}", "i": i}
        if i == 7:
            doc["_id"] = "taken"  # a duplicate: only this one fails
        if i == 11:
            doc["bad"] = "nul\x00char"  # a value PostgreSQL refuses: only this one fails
        return await core.create("w", doc)

    before = backend.endpoints.primary.statements
    results = await asyncio.gather(*(create(i) for i in range(40)), return_exceptions=True)
    statements = backend.endpoints.primary.statements - before
    assert isinstance(results[7], DuplicateId)
    assert isinstance(results[11], InvalidQuery)
    assert sum(not isinstance(r, BaseException) for r in results) == 38
    assert statements < 40  # batched (a failed batch is replayed one by one)
    assert await core.count("w", None) == 39
    rows = await backend.audit_log(collection="w", limit=1000)
    by_request = {r["request_id"]: r for r in rows}
    assert set(by_request) == {"", *(f"req-{i}" for i in range(40) if i not in (7, 11))}
    assert by_request["req-5"]["service"] == "svc2" and by_request["req-5"]["ids"] == ["n5"]


async def test_cache_misses_share_one_fill_that_a_write_detaches(
    backend: PostgresBackend,
) -> None:
    """Concurrent misses of one cached key cost one Redis lookup, one read and one fill;
    a write forgets the in-flight fill before it returns, so a read that starts after the
    write never joins a fill that started before it."""
    from proxy.backends.redis import RedisCache
    from proxy.cache import NearCache, TwoLevelCache
    from proxy.cache.read_through import Fills
    from proxy.config import CacheConfig, CollectionCache

    config = Config(cache=CacheConfig(collections={"c": CollectionCache(True, 60.0)}))
    tag = uuid.uuid4().hex
    remote = RedisCache(
        "redis://127.0.0.1:6379/0", timeout=1.0, prefix=f"test:fill:{tag}:", channel=f"fill:{tag}"
    )
    fills = Fills()
    cache = TwoLevelCache(NearCache(1000, 1 << 20), remote, ttl_default=60.0, forget=fills.forget)
    core = Core(config, {"main": backend}, "main", cache=cache, fills=fills)
    await cache.start(wait=5.0)
    try:
        await core.create("c", [{"_id": "k", "n": 0}])
        await cache.invalidate(core._cache_key("c", "k"), 1)  # nothing cached yet
        before = backend.endpoints.primary.statements
        results = await asyncio.gather(*(core.get("c", "k") for _ in range(50)))
        assert {orjson.loads(r.body)["n"] for r in results} == {0}
        assert backend.endpoints.primary.statements - before == 1
        assert cache.misses == 1  # one Redis lookup for the 50 reads
        await core.settle()  # the fill lands after the answers
        assert cache.near.get(core._cache_key("c", "k")) is not None

        # a fill in flight, then a write: the next read must not join the old fill
        key = core._cache_key("c", "k")
        cache.near.clear()
        first = asyncio.ensure_future(core.get("c", "k"))
        await asyncio.sleep(0)  # the fill has started (its Redis lookup is in flight)
        assert key in core._fills
        await core.replace_or_update("c", "k", {"$set": {"n": 1}})
        assert key not in core._fills  # forgotten by the write's invalidation
        after = await core.get("c", "k")
        assert orjson.loads(after.body)["n"] == 1
        await first  # concurrent with the write: either version is fine
    finally:
        await cache.close()
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = [k async for k in client.scan_iter(match=f"test:fill:{tag}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
