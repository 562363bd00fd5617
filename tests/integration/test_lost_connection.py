"""A connection lost inside a transaction the caller did not open (an idempotent write, a
batch) is 503 database_unavailable, retryable; inside an interactive one it aborts it (409)."""

from __future__ import annotations

import asyncpg
import pytest

from proxy.backends.base import Documents, TxKind
from proxy.backends.postgres import PostgresTransaction
from proxy.config import Limits
from proxy.errors import Conflict, Unavailable
from proxy.query.spec import StoredReply
from tests.backends import open_core

pytestmark = pytest.mark.integration


async def _kill(pg_dsn: str, pid: int) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_idempotent_write_on_a_lost_connection_is_unavailable(
    pg_dsn: str, limits: Limits, tmp_path: str
) -> None:
    async with open_core("postgresql", pg_dsn, limits, str(tmp_path)) as core:
        await core.backend().insert_one("lost", {"_id": "warm"})  # the table exists

        async def produce(tx: Documents) -> StoredReply:
            assert isinstance(tx, PostgresTransaction)
            await _kill(pg_dsn, tx.backend_pid())
            await tx.insert_one("lost", {"_id": "a"})
            return StoredReply(201, b"{}", {})

        with pytest.raises(Unavailable) as caught:
            await core.idempotent("k1", "fp", produce)
        assert caught.value.status == 503 and caught.value.retryable
        assert await core.count("lost", None) == 1  # nothing was written


async def test_interactive_transaction_on_a_lost_connection_is_aborted(
    pg_dsn: str, limits: Limits, tmp_path: str
) -> None:
    async with open_core("postgresql", pg_dsn, limits, str(tmp_path)) as core:
        await core.backend().insert_one("lost", {"_id": "warm"})
        tx = await core.backend().begin("read_committed", TxKind.INTERACTIVE)
        assert isinstance(tx, PostgresTransaction)
        try:
            await _kill(pg_dsn, tx.backend_pid())
            with pytest.raises(Conflict) as caught:
                await tx.insert_one("lost", {"_id": "b"})
            assert caught.value.code == "transaction_aborted"
        finally:
            await tx.rollback()
