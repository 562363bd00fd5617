"""The pool's release hook (``pgpool.keep_session``): no reset round trip per statement,
and still no transaction carried over to the next borrower. Real PostgreSQL."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from proxy.backends.postgres.pool import EndpointSet
from proxy.config import DatabaseConfig, Limits, PoolSettings


async def _endpoints(dsn: str) -> EndpointSet:
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=dsn,
        pool_settings=PoolSettings(min_connections=1, max_connections=1, timeout_seconds=2),
    )
    eps = EndpointSet(cfg, Limits())
    eps.primary.pool = await eps.open_pool(eps.primary)
    return eps


async def test_release_sends_no_reset_query(pg_dsn: str) -> None:
    eps = await _endpoints(pg_dsn)
    pool = eps.primary.pool
    assert pool is not None
    sent: list[str] = []
    try:
        conn = await eps.acquire(eps.primary, 2.0)
        conn.add_query_logger(lambda record: sent.append(record.query))
        assert await conn.fetchval("SELECT 41 + 1") == 42
        await pool.release(conn)
        again = await eps.acquire(eps.primary, 2.0)  # the same one: the pool holds one
        assert await again.fetchval("SELECT 2") == 2
        await pool.release(again)
    finally:
        pool.terminate()  # close() would wait forever for a connection a failure kept
    sent.remove("SELECT 2")
    assert sent == ["SELECT 41 + 1"], sent  # asyncpg's default would add RESET ALL etc.


async def test_a_transaction_left_open_is_rolled_back_on_release(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    eps = await _endpoints(pg_dsn)
    pool = eps.primary.pool
    assert pool is not None
    try:
        conn = await eps.acquire(eps.primary, 2.0)
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
        assert conn.is_in_transaction()
        with caplog.at_level(logging.ERROR):
            await pool.release(conn)  # asyncpg complains, then rolls back
        again = await eps.acquire(eps.primary, 2.0)
        try:
            assert not again.is_in_transaction()
            # the temp table was created inside the rolled-back transaction
            with pytest.raises(asyncpg.UndefinedTableError):
                await again.fetchval("SELECT count(*) FROM left_open")
        finally:
            await pool.release(again)
    finally:
        pool.terminate()
