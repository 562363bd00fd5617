"""Partitioning scenario (issue 21): a month's 10 newest documents of a 12-month, time-
partitioned collection against the same query on one table, and a 3-month retention by
partition drops (pg_partman's run_maintenance when the server has it, else the sidecar's
upkeep: --own-upkeep) against the DELETE one table needs. Run: python -m benchmarks.partitioning"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time
import uuid
from typing import Any

import asyncpg

from proxy.backends.postgres import PostgresBackend, partman
from proxy.backends.postgres.partitions import PartKey, next_period, period_start
from proxy.backends.postgres.timeparts import UpkeepCounts, run_upkeep
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.schema.partitioning import parse_partitioning
from tests.backends import core_over

FIELDS = [{"name": "at", "type": "datetime", "required": True}, {"name": "n", "type": "integer"}]
TIME = {"strategy": "time", "key": "at", "interval": "month", "premake": 1, "unique_id": "per_key"}
_FILL = (
    "INSERT INTO {table} ({cols}) SELECT 'e' || i, {pkey}jsonb_build_object('_id', 'e' || i, "
    "'at', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'n', i, "
    "'_version', 1) FROM (SELECT i, date_trunc('second', $1::timestamptz + ((i - 1) * "
    "$3::float8 / $2) * interval '1 second') AS ts FROM generate_series(1, $2) i) s"
)


async def _migrate(backend: PostgresBackend, *ops: dict[str, Any]) -> None:
    runner = MigrationRunner({"main": backend.migrations()}, "main")
    raw = {"id": f"b{uuid.uuid4().hex[:8]}", "version": 1, "script": {"operations": list(ops)}}
    out = await runner.submit(parse_migration(raw), wait=600.0)
    assert out.status == 201, out.body


async def _setup(backend: PostgresBackend, docs: int, first: dt.datetime, now: dt.datetime) -> None:
    index = {"name": "by_at", "fields": ["-at"]}
    for coll, part in (("events_p", TIME), ("events", None)):
        schema: dict[str, Any] = {"fields": FIELDS}
        if part:
            schema["partitioning"] = part
        await _migrate(backend, {"op": "create_collection", "collection": coll, "schema": schema})
    await backend.load_schemas()
    past = [next_period(first, "month", i) for i in range(11)]
    async with backend._conn() as conn:
        ps = await partman.installed(conn)
        if ps is not None and await partman.managed(conn, ps, "bench.events_p"):
            # the eleven months before this one, as pg_partman would have made them
            await conn.execute("SET TimeZone = 'UTC'")
            await conn.execute(
                f"SELECT {ps}.create_partition_time($1, $2::timestamptz[])", "bench.events_p", past
            )
            await conn.execute("RESET TimeZone")
        else:  # the same, as the sidecar's upkeep would have
            for month in past:
                await backend.partition_upkeep(month)
    span = (now - first).total_seconds()
    async with backend._conn() as conn:
        for coll, pkey in (("events_p", "ts, "), ("events", "")):
            cols = "_id, _pkey, doc" if pkey else "_id, doc"
            sql = _FILL.format(table=backend._table(coll), cols=cols, pkey=pkey)
            await conn.execute(sql, first, docs, span, timeout=3600)
            await conn.execute(f"ANALYZE {backend._table(coll)}")
    for coll in ("events_p", "events"):
        await _migrate(backend, {"op": "create_index", "collection": coll, "index": index})


async def _query(core: Any, coll: str, lo: dt.datetime, hi: dt.datetime, runs: int) -> float:
    raw = {
        "filter": {
            "at": {
                "$gte": lo.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "$lt": hi.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        },
        "sort": "-at",
        "limit": 10,
    }
    spec = core.find_spec(raw, from_url=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        page = await core.backends["main"].find(coll, spec)  # the database, no cache
        times.append(time.perf_counter() - start)
        assert len(page.items) == 10
    return statistics.median(times) * 1000


async def main(dsn: str, docs: int, runs: int, own_upkeep: bool = False) -> dict[str, Any]:
    name = f"dbproxy_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = dsn.rsplit("/", 1)[0] + "/" + name
    cfg = DatabaseConfig(
        name="main", type="postgresql", connection_string=base,
        pool_settings=PoolSettings(min_connections=1, max_connections=4, timeout_seconds=30),
    )  # fmt: skip
    limits = Limits(statement_timeout_seconds=60.0)
    backend = PostgresBackend(cfg, limits, schema="bench", coalesce=False, partman=not own_upkeep)
    try:
        await backend.start()
        now = dt.datetime.now(dt.UTC)
        this = period_start(now, "month")
        first = next_period(this, "month", -11)
        await _setup(backend, docs, first, now)
        core = core_over(backend, limits)
        await core.refresh_schemas()
        lo, hi = next_period(this, "month", -5), next_period(this, "month", -4)
        part_ms = await _query(core, "events_p", lo, hi, runs)
        plain_ms = await _query(core, "events", lo, hi, runs)
        key = PartKey(parse_partitioning({**TIME, "retention": 3}), backend._schema_ident)
        async with backend._conn() as conn:
            ps = await partman.installed(conn)
            by = "sidecar"
            if ps is not None and await partman.managed(conn, ps, "bench.events_p"):
                by = "pg_partman"  # the declared retention of 3 months, as a migration sets it
                await conn.execute(
                    f"UPDATE {ps}.part_config SET retention = $1 WHERE parent_table = $2",
                    partman.retention_interval(key),
                    "bench.events_p",
                )
            counts = UpkeepCounts()
            tables = {"events_p": (backend._table("events_p"), key)}
            start = time.perf_counter()
            await run_upkeep(conn, "bench", tables, now, counts)
            drop_s = time.perf_counter() - start
            assert counts.dropped == 9, counts
            cutoff = next_period(this, "month", -2).strftime("%Y-%m-%dT%H:%M:%SZ")
            start = time.perf_counter()
            deleted = await conn.execute(
                f"DELETE FROM {backend._table('events')} WHERE doc ->> 'at' < $1",
                cutoff,
                timeout=3600,
            )
            delete_s = time.perf_counter() - start
        return {
            "docs": docs,
            "month_newest10_partitioned_ms": round(part_ms, 3),
            "month_newest10_unpartitioned_ms": round(plain_ms, 3),
            "speedup": round(plain_ms / part_ms, 2),
            "retention_by": by,
            "retention_drop_9_months_s": round(drop_s, 3),
            "retention_delete_s": round(delete_s, 3),
            "deleted_rows": int(deleted.split()[-1]),
        }
    finally:
        await backend.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--own-upkeep",
        action="store_true",
        help="the sidecar keeps time partitions, not pg_partman",
    )
    args = parser.parse_args()
    print(asyncio.run(main(args.dsn, args.docs, args.runs, args.own_upkeep)))
