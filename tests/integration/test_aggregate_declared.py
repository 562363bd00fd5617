"""Aggregation over a collection with an enforced schema: the compilers may rely on the
declared scalar kinds while the documents are as stored (one containment test for an
equality, numeric aggregates without a type test), and every answer is the one the same
documents give undeclared, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import context
from proxy.config import Limits
from proxy.errors import InvalidQuery
from proxy.pipeline.core import Core
from tests.backends import kinds_with, open_core
from tests.integration.test_schema_enforcement import declare

pytestmark = pytest.mark.integration

SCHEMA = {
    "fields": [
        {"name": "ok", "type": "boolean", "required": True},
        {"name": "n", "type": "integer"},
        {"name": "price", "type": "number"},
        {"name": "maybe", "type": ["number", "null"]},
        {"name": "cat", "type": "string"},
        {"name": "meta", "type": "object"},
        {"name": "meta.w", "type": "number"},
    ]
}
DOCS = [
    {
        "_id": f"d{i}",
        "ok": i % 3 != 0,
        "n": (i * 7) % 10,
        "price": i / 4,
        "maybe": None if i % 4 == 0 else i,
        "cat": f"c{i % 3}",
        "meta": {"w": i % 5},
    }
    for i in range(30)
]
for d in DOCS[::7]:
    del d["n"]  # missing: ignored by the numeric accumulators
PIPELINES: list[list[dict[str, Any]]] = [
    [
        {"$match": {"ok": True}},
        {
            "$group": {
                "_id": "$cat",
                "total": {"$sum": "$n"},
                "avg": {"$avg": "$price"},
                "max": {"$max": "$n"},
                "min": {"$min": "$price"},
                "m": {"$max": "$maybe"},
                "s": {"$sum": "$maybe"},
            }
        },
    ],
    [{"$match": {"meta.w": 3, "ok": False}}, {"$group": {"_id": None, "n": {"$sum": "$n"}}}],
    [{"$sort": {"price": -1}}, {"$limit": 5}, {"$group": {"_id": "$ok", "a": {"$avg": "$n"}}}],
    # reshaped first: the declared kinds no longer hold (n becomes a string here)
    [
        {"$project": {"n": {"$toString": "$n"}, "cat": 1}},
        {"$group": {"_id": "$cat", "t": {"$sum": "$n"}, "m": {"$max": "$n"}}},
    ],
    [{"$match": {"n": 7}}, {"$count": "k"}],
    [{"$match": {"cat": "c1", "ok": True}}, {"$group": {"_id": "$n", "c": {"$sum": 1}}}],
]


@pytest.fixture(params=kinds_with("aggregate", "schemas"))
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        await c.create("declared", [dict(d) for d in DOCS])
        await c.create("plain", [dict(d) for d in DOCS])
        await declare(c, "declared", SCHEMA)
        yield c


async def run(core: Core, collection: str, pipeline: list[Any]) -> list[Any]:
    result = await core.aggregate(collection, {"pipeline": pipeline})
    return [orjson.loads(b) for b in result.items]


@pytest.mark.parametrize("pipeline", PIPELINES)
async def test_declared_answers_are_the_undeclared_ones(core: Core, pipeline: list[Any]) -> None:
    want = await run(core, "plain", pipeline)
    assert want, "the pipeline should give something"
    assert await run(core, "declared", pipeline) == want


async def test_postgresql_compiles_on_the_declared_kinds(core: Core) -> None:
    if core.backend().__class__.__name__ != "PostgresBackend":
        pytest.skip("the statement's shape is PostgreSQL's")
    context.last_statement.set(None)
    await run(core, "declared", PIPELINES[0])
    last = context.last_statement.get()
    assert last is not None
    sql = last[0]
    base = sql.split("), s", 1)[0]
    assert " OR " not in base and base.count("@>") == 1  # one containment test
    # the declared numbers (n: v0, price: v1) are cast as they are, once per row, and
    # summed / compared as numbers alone
    assert "jsonb_typeof(q.a0)" not in sql and "jsonb_typeof(q.a1)" not in sql
    assert "))::numeric AS v0" in sql and "sum(q.v0)" in sql and "max(q.v0)" in sql
    # the nullable number (maybe: a2) keeps its type test, made once for $max and $sum
    assert sql.count("jsonb_typeof(q.a2) = 'number'") == 1 and "sum(q.v2)" in sql


async def test_a_document_breaking_the_schema_fails_cleanly(core: Core) -> None:
    if core.backend().__class__.__name__ != "PostgresBackend":
        pytest.skip("written around dbproxy with SQL")
    backend: Any = core.backend()
    async with backend._conn() as conn:
        await conn.execute(
            f'INSERT INTO "{backend.schema}".declared (_id, doc) VALUES ($1, $2::jsonb)',
            "bad",
            '{"_id": "bad", "ok": true, "n": "seven", "cat": "c1"}',
        )
    with pytest.raises(InvalidQuery) as info:
        await run(core, "declared", PIPELINES[0])
    assert info.value.code == "expression_failed"
