"""Search on PostgreSQL in particular: the declared collection is searched through its GIN
index (EXPLAIN), the stored vector is a generated column every write keeps, and the
statement binds every word of ``q``."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy import context
from proxy.config import Limits
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.core import Core
from tests.backends import open_core

pytestmark = pytest.mark.integration
_ids = itertools.count()


@pytest.fixture
async def core(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core("postgresql", pg_dsn, Limits(), str(tmp_path)) as c:
        docs = [{"_id": f"d{i:05}", "title": f"word{i % 500}", "body": "x"} for i in range(5000)]
        docs[7]["title"] = "needle in a haystack"
        for start in range(0, len(docs), 1000):
            await c.create("big", docs[start : start + 1000])
        runner = MigrationRunner({"main": c.backend().migrations()}, "main")
        search = {"fields": {"title": "A", "body": "D"}, "language": "english"}
        raw = {
            "id": f"p{next(_ids)}",
            "version": 1,
            "script": {"operations": [{"op": "set_search", "collection": "big", "search": search}]},
        }
        await runner.submit(parse_migration(raw))
        await c.refresh_schemas()
        yield c


async def explain(core: Core, body: dict[str, Any]) -> str:
    context.last_statement.set(None)
    await core.search(body)
    last = context.last_statement.get()
    assert last is not None
    sql, args = last
    backend: Any = core.backend()
    async with backend._conn() as conn:
        await conn.execute(f'ANALYZE "{backend.schema}".big')
        rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(r[0] for r in rows)


async def test_a_declared_collection_is_searched_through_its_gin_index(core: Core) -> None:
    plan = await explain(core, {"q": "needle haystack", "collections": ["big"]})
    assert "Bitmap Index Scan on fts_" in plan, plan
    got = await core.search({"q": "needle haystack", "collections": ["big"]})
    assert [i["_id"] for i in got["items"]] == ["d00007"]


async def test_the_vector_is_a_generated_column(core: Core) -> None:
    backend: Any = core.backend()
    async with backend._conn() as conn:
        generated = await conn.fetchval(
            "SELECT attgenerated FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attname = '_search'",
            f'"{backend.schema}".big',
        )
    assert generated in ("s", b"s")  # stored: PostgreSQL computes it in every write's statement


async def test_q_is_bound_never_sql_text(core: Core) -> None:
    context.last_statement.set(None)
    q = 'needle\'); DROP TABLE big; -- "haystack" & | ! :* <->'
    await core.search({"q": q, "collections": ["big"]})
    last = context.last_statement.get()
    assert last is not None
    sql, args = last
    for word in ("needle", "DROP", "haystack"):
        assert word not in sql
    assert any("needle" in str(a) for a in args)
    assert (await core.search({"q": "needle", "collections": ["big"]}))["items"]
