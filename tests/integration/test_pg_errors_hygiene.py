"""PostgreSQL adapter boundary (issue 13 item 12 c, d): driver errors of a broken connection
are 503 (retryable), and a connection always goes back to the pool clean."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.backends.postgres import pool as pgpool
from proxy.backends.postgres import translate

pytestmark = pytest.mark.integration

BROKEN = [
    asyncpg.exceptions.InternalClientError("_on_result: waiter is done"),
    asyncpg.exceptions.OutdatedSchemaCacheError("cached statement plan is invalid"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    asyncpg.InterfaceError("connection is closed"),
    asyncio.IncompleteReadError(b"", 5),
    ConnectionResetError(104, "Connection reset by peer"),
]


@pytest.mark.parametrize("exc", BROKEN, ids=lambda e: type(e).__name__)
def test_broken_connection_errors_are_unavailable(exc: BaseException) -> None:
    err = translate(exc)
    assert err.status == 503 and err.retry_after, (type(exc).__name__, err.code)
    assert isinstance(exc, pgpool.BREAKER_ERRORS)  # and they trip the breaker


async def test_release_returns_a_clean_connection_and_never_raises(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, reset=pgpool.keep_session)
    try:
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
        await pgpool.release(pool, conn)
        again = await pool.acquire()
        assert not again.is_in_transaction()
        assert await again.fetchval("SELECT to_regclass('pg_temp.left_open') IS NULL")
        # a connection that died under a request: released without an error, replaced
        await again.fetchval("SELECT 1")
        again.terminate()
        await pgpool.release(pool, again)
        await pgpool.release(pool, again)  # twice: still no error
        async with pool.acquire() as fresh:
            assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
