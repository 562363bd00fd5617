"""The read cache over every backend: two sidecars (two Cores, each with its own backend and
near cache, sharing Redis) on one database stay coherent after every kind of write, batch
transactions invalidate at commit, and reads carrying a consistency token bypass the cache."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import orjson
import pytest

from proxy import context
from proxy.backends.redis import RedisCache
from proxy.cache import NearCache, TwoLevelCache
from proxy.cache.read_through import Fills
from proxy.config import CacheConfig, CollectionCache, Config, Limits
from proxy.context import RequestContext
from proxy.errors import NotFound
from proxy.pipeline.core import Core
from tests.backends import backend_namespace, kinds_with

pytestmark = pytest.mark.integration
REDIS = "redis://127.0.0.1:6379/0"
CACHED = "hot"
ROUNDS = 60


@asynccontextmanager
async def two_sidecars(kind: str, pg_dsn: str, tmp: Path) -> AsyncIterator[tuple[Core, Core]]:
    tag = uuid.uuid4().hex
    config = Config(
        cache=CacheConfig(redis_url=REDIS, collections={CACHED: CollectionCache(True, 60.0)})
    )
    async with AsyncExitStack() as stack:
        make = await stack.enter_async_context(backend_namespace(kind, pg_dsn, Limits(), str(tmp)))
        cores = []
        for _ in range(2):
            backend = make()
            await backend.start()
            stack.push_async_callback(backend.close)
            fills = Fills()
            remote = RedisCache(REDIS, timeout=1.0, prefix=f"test:cb:{tag}:", channel=f"cb:{tag}")
            cache = TwoLevelCache(
                NearCache(1000, 1 << 20), remote, ttl_default=60.0, forget=fills.forget
            )
            await cache.start(wait=5.0)
            stack.push_async_callback(cache.close)
            cores.append(Core(config, {"main": backend}, "main", cache=cache, fills=fills))
        try:
            yield cores[0], cores[1]
        finally:
            for core in cores:
                await core.settle()
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS)
            keys = [k async for k in client.scan_iter(match=f"test:cb:{tag}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


async def n_of(core: Core, doc_id: str) -> int:
    got = await core.get(CACHED, doc_id)
    return int(orjson.loads(got.body)["n"])


@pytest.mark.parametrize("kind", kinds_with())
async def test_two_sidecars_stay_coherent_after_every_kind_of_write(
    kind: str, pg_dsn: str, tmp_path: Path
) -> None:
    async with two_sidecars(kind, pg_dsn, tmp_path) as (a, b):
        await a.create(CACHED, {"_id": "k", "n": 0})
        stale = []
        for i in range(1, ROUNDS + 1):
            writer, reader = (a, b) if i % 2 else (b, a)
            for core in (a, b):  # both near caches hold the current version
                await n_of(core, "k")
                await core.settle()
            match i % 3:
                case 0:
                    await writer.replace_or_update(CACHED, "k", {"$set": {"n": i}})
                case 1:
                    await writer.replace_or_update(CACHED, "k", {"n": i})
                case _:
                    await writer.merge_patch(CACHED, "k", {"n": i})
            for core in (reader, writer):
                got = await n_of(core, "k")
                if got != i:
                    stale.append((i, got))
        assert stale == []
        hits = sum(c.cache_counters()["near:hit"] for c in (a, b))
        assert hits > ROUNDS  # the reads before each write were served by the near caches
        await a.delete(CACHED, "k")
        for core in (b, a):
            with pytest.raises(NotFound):
                await core.get(CACHED, "k")


@pytest.mark.parametrize("kind", kinds_with())
async def test_a_batch_transaction_invalidates_at_commit(
    kind: str, pg_dsn: str, tmp_path: Path
) -> None:
    async with two_sidecars(kind, pg_dsn, tmp_path) as (a, b):
        await a.create(CACHED, [{"_id": "x", "n": 0}, {"_id": "y", "n": 0}])
        for core in (a, b):
            assert await n_of(core, "x") == 0 == await n_of(core, "y")
            await core.settle()
            assert await n_of(core, "x") == 0  # now a near hit
        update = {"op": "update", "collection": CACHED, "update": {"$set": {"n": 7}}}
        await a.run_batch({"operations": [{**update, "id": "x"}, {**update, "id": "y"}]})
        assert [await n_of(b, d) for d in ("x", "y")] == [7, 7]
        assert [await n_of(a, d) for d in ("x", "y")] == [7, 7]


@pytest.mark.parametrize("kind", kinds_with())
async def test_a_token_read_goes_to_the_database(kind: str, pg_dsn: str, tmp_path: Path) -> None:
    async with two_sidecars(kind, pg_dsn, tmp_path) as (a, b):
        await a.create(CACHED, {"_id": "t", "n": 1})
        assert await n_of(b, "t") == 1
        await b.settle()
        before = b.cache_counters()
        ctx = dataclasses.replace(RequestContext(), min_lsn=1)
        token = context.current.set(ctx)
        try:
            assert await n_of(b, "t") == 1
        finally:
            context.current.reset(token)
        after = b.cache_counters()
        assert after["near:hit"] == before["near:hit"] and after["any:miss"] == before["any:miss"]
