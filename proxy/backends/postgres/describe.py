"""What the schema endpoint reads from PostgreSQL: the declared schemas, and one collection
as the database has it (its indexes, estimates, a bounded sample)."""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from proxy import numbers
from proxy.backends.postgres.sql import LOAD_SCHEMAS

_INDEXES = (
    "SELECT i.relname, ix.indisunique, ix.indisvalid, pg_relation_size(i.oid), "
    "pg_get_indexdef(i.oid), ix.indisprimary FROM pg_index ix "
    "JOIN pg_class i ON i.oid = ix.indexrelid WHERE ix.indrelid = $1::regclass "
    "ORDER BY i.relname"
)
_EXACT_BELOW = 10_000  # rows under which the count is exact rather than the planner's estimate
_ESTIMATE = (
    "SELECT greatest(c.reltuples::bigint, coalesce(s.n_live_tup, 0)), "
    "pg_total_relation_size(c.oid) FROM pg_class c "
    "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = $1::regclass"
)


_PARTITIONS = (
    "SELECT p.relname, p.oid::regclass::text, pg_get_expr(p.relpartbound, p.oid), "
    "greatest(p.reltuples::bigint, coalesce(s.n_live_tup, 0)), pg_table_size(p.oid), "
    "pg_indexes_size(p.oid) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid "
    "LEFT JOIN pg_stat_user_tables s ON s.relid = p.oid "
    "WHERE i.inhparent = to_regclass($1) ORDER BY p.relname"
)
_PARTITION_NAME = re.compile(r"_p_[0-9a-f]{16}_(.+)")
# pg_partman's: <table>_p<YYYY_MM[_DD]> or <table>_p<IYYY>w<IW>, and <table>_default
_PARTMAN_NAME = re.compile(r".+_(p\d{4}(?:_\d{2}){1,2}|p\d{4}w\d{2}|default)")


async def partitions(conn: asyncpg.Connection, table: str, wait: float) -> list[dict[str, Any]]:
    """A partitioned table's partitions: name, bounds (as PostgreSQL writes them), row
    estimate (exact while small), table and index bytes; [] for a plain table."""
    out = []
    for name, qualified, bounds, estimate, size, index_size in await conn.fetch(
        _PARTITIONS, table, timeout=wait
    ):
        if estimate < _EXACT_BELOW:  # the server's own quoting of its own name
            estimate = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT 1 FROM {qualified} LIMIT {_EXACT_BELOW}) s",
                timeout=wait,
            )
        m = _PARTITION_NAME.fullmatch(name) or _PARTMAN_NAME.fullmatch(name)
        out.append(
            {
                "name": m.group(1) if m else name,
                "bounds": bounds,
                "rows_estimate": int(estimate),
                "table_bytes": int(size),
                "index_bytes": int(index_size),
            }
        )
    return out


async def add_partitions(
    conn: asyncpg.Connection, about: dict[str, Any], table: str, wait: float
) -> None:
    """A partitioned collection's stats: its partitions' rows and bytes, and their sums."""
    parts = await partitions(conn, table, wait)
    for figure in ("rows_estimate", "table_bytes", "index_bytes"):
        about[figure] = sum(p[figure] for p in parts)
    about["partitions"] = {
        p["name"]: {k: p[k] for k in ("rows_estimate", "table_bytes", "index_bytes")} for p in parts
    }


async def load_schemas(
    conn: asyncpg.Connection, schema_ident: str, wait: float
) -> dict[str, tuple[int, dict[str, Any]]]:
    rows = await conn.fetch(LOAD_SCHEMAS.format(schema=schema_ident), timeout=wait)
    return {r[0]: (int(r[2]), numbers.loads_stored(r[1])) for r in rows}


async def describe_collection(
    conn: asyncpg.Connection, table: str, sample: int, wait: float
) -> dict[str, Any]:
    """``table`` is the quoted, checked table name (a regclass literal is bound, not text)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table, timeout=wait)
    if not exists:
        return {"exists": False, "indexes": [], "estimated_count": 0, "size_bytes": 0, "sample": []}
    indexes = [
        {
            "physical_name": r[0],
            "unique": bool(r[1]),
            "valid": bool(r[2]),
            "size_bytes": int(r[3]),
            "definition": r[4],
        }
        for r in await conn.fetch(_INDEXES, table, timeout=wait)
        if not r[5]  # the primary key (_id) is not a declared index
    ]
    estimate, size = await conn.fetchrow(_ESTIMATE, table, timeout=wait)
    parts = await partitions(conn, table, wait)
    if parts:  # a partitioned table holds nothing itself: its partitions add up
        size = sum(p["table_bytes"] + p["index_bytes"] for p in parts)
        estimate = sum(p["rows_estimate"] for p in parts)
    if estimate < _EXACT_BELOW:  # statistics lag behind a small table: count it (bounded)
        estimate = await conn.fetchval(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT {_EXACT_BELOW}) s", timeout=wait
        )
    docs = []
    if sample > 0:
        rows = await conn.fetch(f"SELECT doc::text FROM {table} LIMIT $1", sample, timeout=wait)
        docs = [numbers.loads_stored(r[0]) for r in rows]
    return {
        "exists": True,
        "indexes": indexes,
        "estimated_count": int(estimate),
        "size_bytes": int(size),
        "sample": docs,
        "partitions": parts,
    }
