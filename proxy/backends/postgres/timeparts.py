"""Time partitions kept current: ``premake`` intervals made ahead, partitions past
``retention`` dropped (a partition drop, never a DELETE), one runner fleet-wide."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Final

import asyncpg

import proxy.backends.postgres.partman as partman
from proxy.backends.postgres.partitions import (
    PartKey,
    name_child_indexes,
    next_period,
    partition_table,
    period_start,
    time_bounds,
    time_children,
    time_partition_name,
)

log = logging.getLogger(__name__)
# the advisory lock's first key (the second: the schema): one upkeep at a time, fleet-wide
UPKEEP_LOCK: Final = 0x64627074  # 'dbpt'


@dataclass
class UpkeepCounts:
    """What time-partition upkeep did, since start (exported as metrics)."""

    created: int = 0
    dropped: int = 0
    skipped: int = 0  # a partition not made: the default partition holds rows of its range
    runs: int = 0
    by_collection: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, int]:
        return {
            "created": self.created,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "runs": self.runs,
        }


async def existing(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """The time partitions of ``table``: their start day (``YYYYMMDD``, from the bounds in
    the catalog, whoever named them) → relation name."""
    found = await time_children(conn, table)
    return {lo.astimezone(dt.UTC).strftime("%Y%m%d"): name for name, (lo, _) in found.items()}


async def upkeep(
    conn: asyncpg.Connection,
    table: str,
    collection: str,
    key: PartKey,
    now: dt.datetime,
    counts: UpkeepCounts,
) -> None:
    """One collection: the intervals from now to ``premake`` ahead made, those wholly before
    the ``retention`` intervals kept (the current one counts) dropped, with their _ids."""
    s = key.spec
    have = await existing(conn, table)
    start = period_start(now, s.interval)
    for i in range(s.premake + 1):
        p = next_period(start, s.interval, i)
        if p.strftime("%Y%m%d") not in have:
            await _make(conn, table, collection, key, p, counts)
    if s.retention is None:
        return
    cutoff = next_period(start, s.interval, -(s.retention - 1))
    for day, name in sorted(have.items()):
        begins = dt.datetime.strptime(day, "%Y%m%d").replace(tzinfo=dt.UTC)
        if next_period(begins, s.interval) <= cutoff:
            await _drop(conn, table, collection, key, name, counts)


async def _make(
    conn: asyncpg.Connection,
    table: str,
    collection: str,
    key: PartKey,
    start: dt.datetime,
    counts: UpkeepCounts,
) -> None:
    target = partition_table(key.schema_ident, collection, time_partition_name(start))
    try:
        bounds = time_bounds(start, key.spec.interval)
        async with conn.transaction():
            await conn.execute(f"CREATE TABLE {target} PARTITION OF {table} {bounds}")
            await name_child_indexes(conn, key.schema_ident, table)
    except asyncpg.CheckViolationError:  # rows of that range wait in the default partition
        counts.skipped += 1
        log.warning("time partition %s of %s not made: rows in the default", start, collection)
        return
    counts.created += 1


async def _drop(
    conn: asyncpg.Connection,
    table: str,
    collection: str,
    key: PartKey,
    name: str,
    counts: UpkeepCounts,
) -> None:
    target = f'{key.schema_ident}."{name}"'
    async with conn.transaction():
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {target}")
        if key.registered():  # the dropped _ids may be used again
            await conn.execute(
                f"DELETE FROM {key.schema_ident}._ids r USING {target} p "
                "WHERE r.collection = $1 AND r._id = p._id",
                collection,
            )
        await conn.execute(f"DROP TABLE {target}")
    counts.dropped += 1
    counts.by_collection[collection] = counts.by_collection.get(collection, 0) + 1


async def run_upkeep(
    conn: asyncpg.Connection,
    schema: str,
    tables: dict[str, tuple[str, PartKey]],
    now: dt.datetime,
    counts: UpkeepCounts,
) -> bool:
    """Every time-partitioned collection of ``tables`` (name → table, key), if this process
    takes the fleet-wide lock (False: another one holds it, nothing done): pg_partman's
    ``run_maintenance`` for those registered with it (the database's clock), else our own."""
    got = await conn.fetchval(
        "SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)", UPKEEP_LOCK, schema
    )
    if not got:
        return False
    try:
        ps = await partman.installed(conn)
        for collection, (table, key) in sorted(tables.items()):
            parent = f"{schema}.{collection}"  # pg_partman's name of the table
            if ps is not None and await partman.managed(conn, ps, parent):
                made, dropped = await partman.maintain(conn, ps, parent, table, collection, key)
                counts.created += made
                counts.dropped += dropped
                if dropped:
                    counts.by_collection[collection] = (
                        counts.by_collection.get(collection, 0) + dropped
                    )
            else:  # the fallback: the sidecar's own create and drop, at ``now``
                await upkeep(conn, table, collection, key, now, counts)
        counts.runs += 1
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2) & 2147483647)", UPKEEP_LOCK, schema
        )
    return True
