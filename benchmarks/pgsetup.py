"""The scratch database: create/drop it, the sidecar's table layout, seeding, per-round resets."""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from benchmarks import search, workload
from benchmarks.workload import Scenario

DDL = """CREATE TABLE IF NOT EXISTS dbproxy."{c}" (_id text COLLATE "C" PRIMARY KEY,
doc jsonb NOT NULL, _version bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
updated_at timestamptz NOT NULL DEFAULT now())"""
GIN = 'CREATE INDEX IF NOT EXISTS "{c}_doc_gin" ON dbproxy."{c}" USING gin (doc jsonb_path_ops)'
# the baseline's hand-written expression index of list_indexed
LIST_RAW_INDEX = (
    'CREATE INDEX IF NOT EXISTS bench_list_raw ON dbproxy."bench_list" '
    "((doc -> 'grp'), (doc -> 'n'))"
)
# the declared schemas of the sidecar's collections (the seed's Collection Schema model)
LIST_SCHEMA: dict[str, Any] = {
    "name": "bench_list",
    "fields": [
        {"name": "grp", "type": "integer", "required": True},
        {"name": "n", "type": "integer", "required": True},
    ],
    "indexes": [{"name": "bench_list_grp_n", "fields": ["grp", "n"]}],
    "validation": {"level": "strict", "action": "error"},
}
# agg_group_schema: bench_agg's documents (workload.agg_doc) in a collection declaring them
AGG_SCHEMA: dict[str, Any] = {
    "name": "bench_agg_s",
    "fields": [
        {"name": "cat", "type": "string", "required": True},
        {"name": "n", "type": "integer", "required": True},
        {"name": "price", "type": "number", "required": True},
        {"name": "ok", "type": "boolean", "required": True},
    ],
    "validation": {"level": "strict", "action": "error"},
}
SCHEMA6 = {
    "name": "bench_create6",
    "fields": [
        {"name": "name", "type": "string", "required": True},
        {"name": "age", "type": "integer", "constraints": ["min:0", "max:150"]},
        {"name": "email", "type": "string", "constraints": ["max_length:200"]},
        {"name": "active", "type": "boolean"},
        {"name": "score", "type": "number"},
        {"name": "city", "type": "string"},
    ],
    "validation": {"level": "strict", "action": "error"},
}


def with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))


# ---------------------------------------------------------------- database


async def _admin(admin_url: str, *stmts: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        for s in stmts:
            await conn.execute(s, timeout=120)
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def create_database(admin_url: str, name: str) -> None:
    asyncio.run(
        _admin(
            admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
    )


def drop_database(admin_url: str, name: str) -> None:
    asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _missing_tables(url: str, collections: list[str]) -> list[str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        q = "SELECT to_regclass(format('dbproxy.%I', $1::text)) IS NULL"
        return [c for c in collections if await conn.fetchval(q, c, timeout=10)]
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def missing_tables(url: str, collections: list[str]) -> list[str]:
    return asyncio.run(_missing_tables(url, collections))


def create_tables(url: str, collections: list[str]) -> None:
    stmts = ["CREATE SCHEMA IF NOT EXISTS dbproxy"]
    stmts += [s.format(c=c) for c in collections for s in (DDL, GIN)]
    asyncio.run(_admin(url, *stmts))


async def _seed_agg(conn: asyncpg.Connection, collection: str) -> None:
    """bench_agg / bench_agg_s: workload.AGG_DOCS documents of workload.agg_doc, by COPY."""
    rows = [
        (d["_id"], orjson.dumps(d).decode(), 1)
        for d in map(workload.agg_doc, range(1, workload.AGG_DOCS + 1))
    ]
    await conn.copy_records_to_table(
        collection, schema_name="dbproxy", columns=["_id", "doc", "_version"], records=rows
    )
    await conn.execute(f'VACUUM ANALYZE dbproxy."{collection}"', timeout=120)


async def _seed_agg_big(conn: asyncpg.Connection, n: int = workload.AGG_BIG_DOCS) -> None:
    """bench_agg_big: ``n`` documents of workload.agg_doc built by PostgreSQL itself (one
    INSERT ... SELECT over generate_series). The table's secondary indexes (the sidecar's
    GIN index) are dropped first and built again after, which is several times faster than
    maintaining them row by row."""
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS ddl "
        "FROM pg_index i WHERE i.indrelid = 'dbproxy.bench_agg_big'::regclass "
        "AND NOT i.indisprimary",
        timeout=10,
    )
    for ix in indexes:
        await conn.execute(f"DROP INDEX {ix['name']}", timeout=60)
    await conn.execute(
        'INSERT INTO dbproxy."bench_agg_big" (_id, doc, _version) '
        f"SELECT 'a-' || lpad(i::text, 7, '0'), {workload.AGG_DOC_SQL}, 1 "
        "FROM generate_series(1, $1::bigint) AS i",
        n,
        timeout=900,
    )
    for ix in indexes:
        await conn.execute(ix["ddl"], timeout=900)
    await conn.execute('VACUUM ANALYZE dbproxy."bench_agg_big"', timeout=900)


async def _seed(url: str, collections: list[str], n: int, agg: tuple[str, ...] = ()) -> None:
    rng = random.Random(42)
    groups = workload.n_groups(n)
    rows = []
    for i in range(1, n + 1):
        doc = workload.seed_doc(i, rng, groups)
        rows.append((doc["_id"], orjson.dumps(doc).decode(), 1))
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for c in collections:  # probe documents out
            await conn.execute(f'TRUNCATE dbproxy."{c}"', timeout=60)
        await conn.copy_records_to_table(
            "bench", schema_name="dbproxy", columns=["_id", "doc", "_version"], records=rows
        )
        await conn.execute('VACUUM ANALYZE dbproxy."bench"', timeout=120)
        if "bench_list" in collections:
            listed = [
                (d["_id"], orjson.dumps(d).decode(), 1)
                for d in map(workload.list_doc, range(workload.LIST_DOCS))
            ]
            await conn.copy_records_to_table(
                "bench_list",
                schema_name="dbproxy",
                columns=["_id", "doc", "_version"],
                records=listed,
            )
            await conn.execute(LIST_RAW_INDEX, timeout=120)
            await conn.execute('VACUUM ANALYZE dbproxy."bench_list"', timeout=120)
        for name in ("bench_agg", "bench_agg_s"):
            if name in agg:
                await _seed_agg(conn, name)
        if search.COLLECTION in agg:
            await conn.copy_records_to_table(
                search.COLLECTION,
                schema_name="dbproxy",
                columns=["_id", "doc", "_version"],
                records=search.rows(),
            )
            await conn.execute(f'VACUUM ANALYZE dbproxy."{search.COLLECTION}"', timeout=120)
        if "bench_agg_big" in agg:
            await _seed_agg_big(conn)
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def schema_migration() -> dict[str, Any]:
    """The migration the harness POSTs to the sidecar (``POST /api/db/migrations``): the
    declared schemas of ``bench_list``, ``bench_create6`` and ``bench_agg_s``, bench_list's
    (grp, n) index (built on the compiler's declared expressions) and what is searched in
    ``bench_search``."""
    ops: list[dict[str, Any]] = [
        {"op": "create_collection", "collection": raw["name"], "schema": raw}
        for raw in (LIST_SCHEMA, SCHEMA6, AGG_SCHEMA)
    ]
    for ix in LIST_SCHEMA["indexes"]:
        ops.append({"op": "create_index", "collection": "bench_list", "index": ix})
    ops += search.migration_ops()
    return {
        "id": "bench-schemas",
        "name": "benchmark schemas",
        "version": 1,
        "script": {"operations": ops},
    }


async def _analyze(url: str, collections: list[str]) -> None:
    await _admin(url, *(f'VACUUM ANALYZE dbproxy."{c}"' for c in collections))


def analyze(url: str, collections: list[str]) -> None:
    asyncio.run(_analyze(url, collections))


def seed(url: str, collections: list[str], n: int, agg: tuple[str, ...] = ()) -> None:
    """Empty every collection, seed ``bench`` (n documents) and ``bench_list``, and the
    aggregation collections named in ``agg`` (``bench_agg``, ``bench_agg_big``)."""
    asyncio.run(_seed(url, collections, n, agg))


async def _reset(url: str, sc: Scenario) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        if sc.reset == "truncate":
            await conn.execute(f'TRUNCATE dbproxy."{sc.collection}"', timeout=60)
        if await conn.fetchval("SELECT to_regclass('dbproxy._audit') IS NOT NULL", timeout=10):
            await conn.execute("TRUNCATE dbproxy._audit", timeout=60)  # the sidecar's audit rows
        await conn.execute("CHECKPOINT", timeout=120)
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)


def reset_for_write_round(url: str, sc: Scenario) -> None:
    """Same starting point for every round of a write scenario: (empty table,) no audit
    rows, no pending checkpoint."""
    asyncio.run(_reset(url, sc))


async def server_version(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version", timeout=10))
    finally:
        await asyncio.wait_for(conn.close(), timeout=10)
