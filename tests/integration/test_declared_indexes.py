"""Finds on declared, indexed scalar paths run on the index: an expression index built with
``declared_expr`` (as a migration's create_index builds it) and the SQL the compiler emits
for the find, EXPLAINed on both backends (PostgreSQL's plan tree; SQLite's query plan)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio

from proxy.backends.base import Backend
from proxy.backends.postgres import PostgresBackend
from proxy.backends.sqlite import SqliteBackend
from proxy.backends.sqlite.ddl import table_name
from proxy.config import Limits
from proxy.query import pg
from proxy.query.pg_typed import declared_order
from proxy.query.spec import build_find_spec
from proxy.query.sqlite import values as sqlite_values
from tests.backends import kinds_with, open_backend

# MongoDB declares schemas but has no SQL plan to read (see test_mongo_schemas.py)
SQL_KINDS = [
    k
    if k != "mongodb"
    else pytest.param(
        k,
        marks=pytest.mark.skip(
            reason="SQL EXPLAIN plans; MongoDB index use: test_mongo_schemas.py"
        ),
    )
    for k in kinds_with("schemas")
]

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

LIMITS = Limits()
KINDS_OF = ((("grp",), "number"), (("n",), "number"), (("s",), "string"))
N_DOCS = 20_000
C = "declared"
# index name -> its keys (path, kind, descending)
INDEXES = {
    "ix_grp_n": ((("grp",), "number", False), (("n",), "number", False)),
    "ix_n": ((("n",), "number", False),),
    "ix_s": ((("s",), "string", False),),
}


def _doc(i: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": f"d{i:06d}", "grp": i % 100, "n": i, "pad": "x" * 40}
    if i % 7:
        doc["s"] = f"s{(i * 7919) % N_DOCS:06d}"
    return doc


async def _load(backend: Backend) -> None:
    for start in range(0, N_DOCS, 2000):
        docs = [_doc(i) for i in range(start, start + 2000)]
        out = await backend.insert_many(C, docs)
        assert all(r.status == 201 for r in out)


async def _pg_indexes(backend: PostgresBackend, pg_dsn: str) -> None:
    table = f'"{backend.schema}"."{C}"'
    conn = await asyncpg.connect(pg_dsn)
    try:
        for name, keys in INDEXES.items():
            cols = ", ".join(declared_order(p, k, d, doc="doc") for p, k, d in keys)
            await conn.execute(f'CREATE INDEX "{name}" ON {table} ({cols})')
        await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()


async def _sqlite_indexes(backend: SqliteBackend) -> None:
    def run(conn: sqlite3.Connection) -> None:
        for name, keys in INDEXES.items():
            cols = ", ".join(sqlite_values.declared_expr(p, k, doc="doc") for p, k, _ in keys)
            conn.execute(f'CREATE INDEX "{name}" ON {table_name(C)} ({cols})')
        conn.execute("ANALYZE")

    await backend._write(None, run)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=SQL_KINDS)
async def loaded(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any
) -> AsyncIterator[Backend]:
    tmp = tmp_path_factory.mktemp("declared_ix")
    async with open_backend(request.param, pg_dsn, LIMITS, str(tmp)) as backend:
        await _load(backend)
        if isinstance(backend, PostgresBackend):
            await _pg_indexes(backend, pg_dsn)
        else:
            assert isinstance(backend, SqliteBackend)
            await _sqlite_indexes(backend)
        yield backend


def _spec(raw: dict[str, Any]) -> Any:
    return dataclasses.replace(build_find_spec(raw, LIMITS, from_url=False), kinds=KINDS_OF)


def _pg_nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    out, stack = [], [plan]
    while stack:
        node = stack.pop()
        out.append((node["Node Type"], node.get("Index Name")))
        stack.extend(node.get("Plans", []))
    return out


async def _plan(backend: Backend, raw: dict[str, Any]) -> str:
    """The plan of the find's own SQL: PostgreSQL's node types and index names, SQLite's
    EXPLAIN QUERY PLAN lines."""
    spec = _spec(raw)
    if isinstance(backend, PostgresBackend):
        statement = backend.find_statement(C, spec)
        async with backend._conn() as conn:
            raw_plan = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) {statement.sql}", *statement.args
            )
        plan = (orjson.loads(raw_plan) if isinstance(raw_plan, str) else raw_plan)[0]["Plan"]
        return repr(_pg_nodes(plan))
    assert isinstance(backend, SqliteBackend)
    sql, args, _ = backend.find_statement(C, spec)

    def run(conn: sqlite3.Connection) -> str:
        return "\n".join(str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))

    return str(await backend._read(run))


def _uses(plan: str, backend: Backend, index: str) -> bool:
    if isinstance(backend, PostgresBackend):
        scans = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
        return any(f"('{s}', '{index}')" in plan for s in scans)
    return f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan


CASES = [
    ("equality", {"filter": {"n": 1234}, "limit": 10}, ("ix_n",)),
    ("equality_sort", {"filter": {"grp": 7}, "sort": "n", "limit": 10}, ("ix_grp_n",)),
    ("range", {"filter": {"n": {"$gte": N_DOCS - 30, "$lt": N_DOCS - 10}}}, ("ix_n",)),
    ("range_sort", {"filter": {"n": {"$gte": N_DOCS - 30}}, "sort": "n"}, ("ix_n",)),
    (
        "equality_range_sort",
        {"filter": {"grp": 7, "n": {"$gte": 5000}}, "sort": "n", "limit": 10},
        ("ix_grp_n",),
    ),
    ("sort_limit", {"sort": "n", "limit": 10}, ("ix_n",)),
    ("sort_desc_limit", {"sort": "-n", "limit": 10}, ("ix_n",)),
    ("string_equality", {"filter": {"s": "s000123"}, "limit": 10}, ("ix_s",)),
    ("string_sort", {"sort": "s", "limit": 10}, ("ix_s",)),
    ("string_sort_desc", {"sort": "-s", "limit": 10}, ("ix_s",)),
    ("in", {"filter": {"n": {"$in": [3, 5, 7]}}, "limit": 10}, ("ix_n",)),
]


@pytest.mark.parametrize(("what", "raw", "indexes"), CASES, ids=[c[0] for c in CASES])
async def test_find_uses_the_declared_index(
    loaded: Backend, what: str, raw: dict[str, Any], indexes: tuple[str, ...]
) -> None:
    plan = await _plan(loaded, raw)
    assert any(_uses(plan, loaded, ix) for ix in indexes), (what, plan)


async def test_indexed_answers_are_right(loaded: Backend) -> None:
    page = await loaded.find(C, _spec({"filter": {"grp": 7, "n": {"$gte": 5000}}, "sort": "n"}))
    got = [orjson.loads(b)["n"] for b in page.items[:10]]
    assert got == [n for n in range(5000, N_DOCS) if n % 100 == 7][:10]
    page = await loaded.find(C, _spec({"sort": "s", "limit": 3}))
    first = [orjson.loads(b) for b in page.items]
    assert all("s" not in d for d in first)  # missing first, as MongoDB sorts
    nxt = await loaded.find(C, _spec({"sort": "s", "limit": 3, "next": page.next}))
    assert [orjson.loads(b)["_id"] for b in nxt.items] != [d["_id"] for d in first]


async def test_declared_expressions_are_shared() -> None:
    """The index DDL and the compiler use the same function (proxy.query.pg re-exports it)."""
    assert pg.declared_expr(("n",), "number") == "COALESCE(t.doc -> 'n', 'null'::jsonb)"
    assert declared_order(("s",), "string", True) == (
        "((t.doc ->> 's') COLLATE \"C\") DESC NULLS LAST"
    )
