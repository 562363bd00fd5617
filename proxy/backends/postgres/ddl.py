"""Schema and table creation: the dbproxy schema with its helper functions and bookkeeping
tables, and a collection's table on first use."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import orjson

from proxy.backends.postgres.convert import FROZEN_FUNCTION
from proxy.backends.postgres.partitions import FUNCTIONS, RFC3339
from proxy.backends.postgres.sql import (
    AUDIT_DDL,
    IDEMPOTENCY_DDL,
    INDEX_DDL,
    KEEP_FUNCTION,
    SCHEMAS_DDL,
    TABLE_DDL,
)
from proxy.query.aggregate.pg_functions import AGGREGATE_FUNCTIONS
from proxy.query.pg import HELPER_FUNCTIONS
from proxy.schema.partitioning import Partitioning, parse_partitioning


async def create_schema(conn: asyncpg.Connection, schema: str) -> None:
    """The schema, its functions, the audit and idempotency tables; serialised across
    processes by an advisory lock (the caller holds a transaction open)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbproxy:schema'))")
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    await conn.execute(HELPER_FUNCTIONS.format(schema=schema))
    await conn.execute(AGGREGATE_FUNCTIONS.format(schema=schema))
    await conn.execute(KEEP_FUNCTION.format(schema=schema))
    await conn.execute(AUDIT_DDL.format(schema=schema))
    await conn.execute(IDEMPOTENCY_DDL.format(schema=schema))
    await conn.execute(SCHEMAS_DDL.format(schema=schema))
    await conn.execute(FUNCTIONS.format(schema=schema, rfc3339=RFC3339))
    await conn.execute(FROZEN_FUNCTION.format(schema=schema))


async def create_table(
    conn: asyncpg.Connection, table: str, collection: str, wait: float, schema: str
) -> Partitioning | None:
    """A collection's table and its GIN index, in one transaction bounded by ``wait``
    seconds as a whole: a frozen server must not hold the request (nor the ROLLBACK).
    A partitioned table (made only by a migration) is left as it is: its declaration is
    returned, read from the declared schemas."""
    index = "gin_" + hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()
    async with asyncio.timeout(max(wait, 0.001)), conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"dbproxy:{collection}")
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table
        )
        if kind == "p":
            raw = await conn.fetchval(
                f"SELECT (schema -> 'partitioning')::text FROM {schema}._schemas "
                "WHERE collection = $1",
                collection,
            )
            declared = orjson.loads(raw) if raw else None
            return parse_partitioning(declared) if declared else None
        await conn.execute(TABLE_DDL.format(table=table))
        await conn.execute(INDEX_DDL.format(index=index, table=table))
        return None
