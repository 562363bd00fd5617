"""The replica fixture itself: real streaming replication, paused and resumed replay,
stop and restart with writes in between, and nothing left behind."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.resilience.routing import format_lsn, parse_lsn
from tests.pgcluster import PgCluster
from tests.replica import DIR_PREFIX, Replica

pytestmark = pytest.mark.integration


def database_of(dsn: str) -> str:
    return dsn.rpartition("/")[2]


@pytest.fixture(scope="module")
def table(replica: Replica, primary_dsn: str) -> str:
    """A table on the primary, in the session's test database, already on the replica."""
    replica.query_primary(
        "CREATE TABLE replica_fixture (id int PRIMARY KEY, note text NOT NULL)",
        database_of(primary_dsn),
    )
    replica.wait_caught_up()
    return "replica_fixture"


@pytest.fixture
async def primary(primary_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(primary_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def standby(replica: Replica, primary_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(replica.dsn_for(database_of(primary_dsn)))
    try:
        yield conn
    finally:
        await conn.close()


async def current_lsn(conn: asyncpg.Connection) -> int:
    return parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))


async def test_replica_is_a_read_only_standby(
    replica: Replica, standby: asyncpg.Connection
) -> None:
    assert await standby.fetchval("SELECT pg_is_in_recovery()") is True
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await standby.execute("CREATE TABLE nope (x int)")
    assert replica.root is not None and replica.root.name.startswith(DIR_PREFIX)
    assert replica.port != 5432


async def test_row_written_on_primary_appears_on_replica(
    replica: Replica, table: str, primary: asyncpg.Connection, standby: asyncpg.Connection
) -> None:
    await primary.execute(f"INSERT INTO {table} VALUES (1, 'streamed')")
    written = await current_lsn(primary)
    assert replica.wait_caught_up(written) >= written
    assert await standby.fetchval(f"SELECT note FROM {table} WHERE id = 1") == "streamed"


async def test_paused_replay_hides_new_rows_until_resumed(
    replica: Replica, table: str, primary: asyncpg.Connection, standby: asyncpg.Connection
) -> None:
    replica.wait_caught_up()
    replica.pause_replay()
    try:
        before = replica.replayed_lsn()
        await primary.execute(f"INSERT INTO {table} VALUES (2, 'held back')")
        written = await current_lsn(primary)
        # The WAL has reached the replica (so the row *could* be visible) but is not applied.
        replica.wait_received(written)
        assert await standby.fetchval(f"SELECT count(*) FROM {table} WHERE id = 2") == 0
        replayed = replica.replayed_lsn()
        assert replayed == before
        assert replayed < written, (format_lsn(replayed), format_lsn(written))
        assert replayed < await current_lsn(primary)
        assert replica.replay_paused()
    finally:
        replica.resume_replay()
    assert replica.wait_caught_up(written) >= written
    assert not replica.replay_paused()
    assert await standby.fetchval(f"SELECT note FROM {table} WHERE id = 2") == "held back"


async def test_stop_and_restart_catch_up_on_writes_made_meanwhile(
    replica: Replica, table: str, primary_dsn: str, primary: asyncpg.Connection
) -> None:
    replica.stop()
    assert not replica.running()
    with pytest.raises(OSError):
        await asyncpg.connect(replica.dsn_for(database_of(primary_dsn)), timeout=2)
    await primary.execute(f"INSERT INTO {table} VALUES (3, 'while down')")
    await primary.execute("SELECT pg_switch_wal()")  # the slot must keep the old segment
    written = await current_lsn(primary)
    port = replica.port
    replica.restart()
    assert replica.port == port and replica.running()
    assert replica.replayed_lsn() >= written
    conn = await asyncpg.connect(replica.dsn_for(database_of(primary_dsn)))
    try:
        assert await conn.fetchval(f"SELECT note FROM {table} WHERE id = 3") == "while down"
    finally:
        await conn.close()


def test_reset_brings_back_a_paused_or_stopped_replica(replica: Replica) -> None:
    replica.pause_replay()
    replica.query_primary("SELECT pg_switch_wal()")
    written = replica.primary_lsn()
    replica.reset()
    assert replica.running() and not replica.replay_paused()
    assert replica.replayed_lsn() >= written
    replica.stop()
    replica.reset()
    assert replica.running() and not replica.replay_paused()


def test_destroy_leaves_nothing_behind(primary_node: PgCluster) -> None:
    node = Replica(primary_port=primary_node.port)
    node.start()
    root, slot = node.root, node.slot
    assert root is not None and (root / "data" / "postmaster.pid").exists()
    node.destroy()
    node.destroy()  # idempotent
    assert not Path(root).exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(root) not in ps
    assert (
        node.query_primary(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        == "0"
    )
