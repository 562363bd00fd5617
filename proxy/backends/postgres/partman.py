"""pg_partman keeps time partitions when the database has it: the extension in a schema of its
own, a collection registered with ``create_parent``, ``run_maintenance`` called by the upkeep."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Final

import asyncpg

from proxy.backends.postgres.partitions import (
    PartKey,
    name_child_indexes,
    period_start,
    time_children,
)

log = logging.getLogger(__name__)
SCHEMA: Final = "partman"  # where dbproxy creates the extension when it is not created yet
_INTERVALS: Final = {"day": "daily", "week": "weekly", "month": "monthly"}
_UNITS: Final = {"day": "days", "week": "weeks", "month": "months"}
_UTC: Final = "SELECT set_config('TimeZone', 'UTC', true)"  # bounds at UTC midnights, as ours


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def installed(conn: asyncpg.Connection) -> str | None:
    """The quoted schema of the created pg_partman extension (None: not created)."""
    found = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_partman'"
    )
    return None if found is None else _quoted(found)


async def ensure(conn: asyncpg.Connection) -> str | None:
    """The extension's quoted schema, created in a schema of its own when the server has
    it; None when it has not, or it cannot be created here (the sidecar keeps the partitions)."""
    found = await installed(conn)
    if found is not None:
        return found
    available = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman')"
    )
    if not available:
        return None
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the migration going
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quoted(SCHEMA)}")
            await conn.execute(
                f"CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA {_quoted(SCHEMA)}"
            )
    except asyncpg.PostgresError as exc:
        log.warning("pg_partman not created (%s): the sidecar keeps time partitions", exc.sqlstate)
        return None
    return _quoted(SCHEMA)


def retention_interval(key: PartKey) -> str | None:
    """Our retention (intervals kept, the current one counting) as pg_partman's: a partition
    is dropped once its end is older than now minus this interval."""
    s = key.spec
    return None if s.retention is None else f"{s.retention - 1} {_UNITS[s.interval]}"


async def register(
    conn: asyncpg.Connection, ps: str, parent: str, key: PartKey, now: dt.datetime
) -> None:
    """``parent`` (``schema.table``, unquoted: pg_partman's form) under pg_partman: its
    default and the intervals from now to ``premake`` ahead made, retention dropping tables."""
    s = key.spec
    await conn.execute(_UTC)
    await conn.execute(
        f"SELECT {ps}.create_parent(p_parent_table := $1, p_control := '_pkey', "
        "p_type := 'native', p_interval := $2, p_premake := $3, p_start_partition := $4, "
        "p_automatic_maintenance := 'off', p_jobmon := false)",
        parent,
        _INTERVALS[s.interval],
        s.premake,
        period_start(now, s.interval).isoformat(),
    )
    # infinite: premake from now, not from the newest row; ignore_default_data: a row far
    # ahead in the default does not make partitions up to it
    await conn.execute(
        f"UPDATE {ps}.part_config SET retention = $2, retention_keep_table = false, "
        "retention_keep_index = false, infinite_time_partitions = true, "
        "ignore_default_data = true WHERE parent_table = $1",
        parent,
        retention_interval(key),
    )


async def managed(conn: asyncpg.Connection, ps: str, parent: str) -> bool:
    return bool(
        await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {ps}.part_config WHERE parent_table = $1)", parent
        )
    )


async def unregister(conn: asyncpg.Connection, parent: str) -> None:
    """A dropped collection's pg_partman configuration and template table removed."""
    ps = await installed(conn)
    if ps is None:
        return
    template = await conn.fetchval(
        f"DELETE FROM {ps}.part_config WHERE parent_table = $1 "
        "RETURNING to_regclass(template_table)::text",
        parent,
    )
    if template is not None:  # the server's own quoting of its own name
        await conn.execute(f"DROP TABLE IF EXISTS {template}")


async def maintain(
    conn: asyncpg.Connection, ps: str, parent: str, table: str, collection: str, key: PartKey
) -> tuple[int, int]:
    """pg_partman's ``run_maintenance`` for ``parent`` (the database's clock); (made,
    dropped). With a global _id registry, the entries of the partitions its retention is
    about to drop go first, in the same transaction (undone if they were not dropped)."""
    async with conn.transaction():
        await conn.execute(_UTC)
        before = await time_children(conn, table)
        doomed = await _doomed(conn, before, key)
        for name in doomed:
            await conn.execute(
                f"DELETE FROM {key.schema_ident}._ids r USING {key.schema_ident}.{_quoted(name)} p "
                "WHERE r.collection = $1 AND r._id = p._id",
                collection,
            )
        await conn.execute(f"SELECT {ps}.run_maintenance($1, p_jobmon := false)", parent)
        after = await time_children(conn, table)
        gone = set(before) - set(after)
        if not set(doomed) <= gone:
            raise RuntimeError(f"pg_partman kept partitions of {collection!r} its retention named")
        made = set(after) - set(before)
        if made:
            await name_child_indexes(conn, key.schema_ident, table)
    return len(made), len(gone)


async def _doomed(
    conn: asyncpg.Connection, children: dict[str, tuple[dt.datetime, dt.datetime]], key: PartKey
) -> list[str]:
    """The partitions pg_partman's retention drops now (its rule: the end older than now
    minus the retention, never the newest partition), when their _ids are registered."""
    retention = retention_interval(key)
    if retention is None or not key.registered() or not children:
        return []
    cut = await conn.fetchval("SELECT CURRENT_TIMESTAMP - $1::text::interval", retention)
    newest = max(lo for lo, _ in children.values())
    return sorted(n for n, (lo, hi) in children.items() if hi < cut and lo != newest)
