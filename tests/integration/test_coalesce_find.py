"""Coalesced list queries (PostgreSQL): concurrent finds of one shape share one statement and
each gets exactly the page it gets alone, or its own error."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.backends.postgres.coalesce_find import batched_sql
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.errors import InvalidQuery
from proxy.query import cursor as cursors
from proxy.query.spec import FindSpec, Page, build_find_spec

pytestmark = pytest.mark.integration

LIMITS = Limits()
KINDS = ((("grp",), "number"), (("n",), "number"), (("s",), "string"))


@pytest.fixture
async def backend(pg_dsn: str) -> AsyncIterator[PostgresBackend]:
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=pg_dsn,
        pool_settings=PoolSettings(1, 4, 5),
    )
    b = PostgresBackend(cfg, LIMITS, schema=f"cf_{uuid.uuid4().hex[:10]}")
    await b.start()
    rng = random.Random(7)
    docs: list[dict[str, Any]] = []
    for i in range(600):
        doc: dict[str, Any] = {"_id": f"d{i:04d}", "grp": i % 12, "n": rng.randint(0, 80)}
        if i % 5:
            doc["s"] = rng.choice(["a", "b", "ab", "é", "B"])
        docs.append(doc)
    assert all(r.status == 201 for r in await b.insert_many("c", docs))
    yield b
    async with b._conn() as conn:
        await conn.execute(f'DROP SCHEMA "{b.schema}" CASCADE')
    await b.close()


def _spec(raw: dict[str, Any], typed: bool = True) -> FindSpec:
    spec = build_find_spec(raw, LIMITS, from_url=False)
    return dataclasses.replace(spec, kinds=KINDS) if typed else spec


def _requests(rng: random.Random, n: int) -> list[FindSpec]:
    out = []
    for _ in range(n):
        g, k = rng.randrange(14), rng.randint(0, 90)
        shape = rng.randrange(4)
        if shape == 0:
            raw = {"filter": {"grp": g, "n": {"$gte": k}}, "sort": "n", "limit": rng.randint(1, 12)}
        elif shape == 1:
            raw = {"filter": {"n": {"$lt": k}}, "sort": "-n", "limit": 5, "skip": rng.randint(0, 3)}
        elif shape == 2:
            raw = {"filter": {"s": rng.choice(["a", "b", "zz"])}, "sort": "-s,n", "limit": 7}
        else:
            raw = {"filter": {"grp": g}, "sort": "s", "limit": 4}
        out.append(_spec(raw))
    return out


async def test_concurrent_finds_get_what_they_get_alone(backend: PostgresBackend) -> None:
    specs = _requests(random.Random(1), 240)
    # the next pages too: cursors of typed sort keys ride in batches as values
    backend.coalesce = False
    alone = [await backend.find("c", s) for s in specs]
    follow = [
        dataclasses.replace(s, cursor=p.next) for s, p in zip(specs, alone, strict=True) if p.next
    ]
    alone_next = [await backend.find("c", s) for s in follow]
    backend.coalesce = True
    before = backend.endpoints.primary.statements
    together = await asyncio.gather(*(backend.find("c", s) for s in specs + follow))
    statements = backend.endpoints.primary.statements - before
    assert list(together) == alone + alone_next
    stats = backend.coalescing()
    assert stats["finds"] == len(specs) + len(follow)
    assert statements < (len(specs) + len(follow)) / 4, statements


async def test_a_failing_batch_does_not_mix_callers_errors(backend: PostgresBackend) -> None:
    """One caller's cursor holds a value the database refuses (not JSON): the batch fails,
    each caller runs alone, and only that caller gets the error."""
    good = [_spec({"filter": {"grp": g}, "sort": "n", "limit": 3}) for g in range(8)]
    plan = backend.find_statement("c", good[0]).plan
    bad_cursor = cursors.encode(plan.tag, ["{not json", "d0001"])
    bad = dataclasses.replace(good[0], cursor=bad_cursor)
    backend.coalesce = False
    alone = [await backend.find("c", s) for s in good]
    backend.coalesce = True
    out = await asyncio.gather(
        *(backend.find("c", s) for s in [*good[:4], bad, *good[4:]]), return_exceptions=True
    )
    assert isinstance(out[4], InvalidQuery), out[4]
    assert [r for i, r in enumerate(out) if i != 4] == alone
    assert all(isinstance(r, Page) for i, r in enumerate(out) if i != 4)


async def test_unbatchable_shapes_run_alone(backend: PostgresBackend) -> None:
    """A find with an array parameter ($in, a generic sort path) is not batched: still right."""
    generic = build_find_spec(
        {"filter": {"n": {"$in": [1, 2, 3]}}, "sort": "n"}, LIMITS, from_url=False
    )
    statement = backend.find_statement("c", generic)
    assert batched_sql(statement.sql, statement.plan.order_by("r")) is None
    backend.coalesce = False
    alone = await backend.find("c", generic)
    backend.coalesce = True
    assert (
        list(await asyncio.gather(*(backend.find("c", generic) for _ in range(5)))) == [alone] * 5
    )


def test_batched_sql_shape() -> None:
    sql = "SELECT t.doc::text, t._id AS k0 FROM x t WHERE a = $1::jsonb LIMIT $2::bigint"
    out = batched_sql(sql, "r.k0")
    assert out == (
        "SELECT q.i, r.* FROM unnest($1::jsonb[], $2::bigint[]) WITH ORDINALITY AS q(p1, p2, i) "
        "CROSS JOIN LATERAL (SELECT t.doc::text, t._id AS k0 FROM x t WHERE a = q.p1 "
        "LIMIT q.p2) r ORDER BY q.i, r.k0"
    )
    assert batched_sql("SELECT $1::text[]", "r.k0") is None
    assert batched_sql("SELECT $1", "r.k0") is None
