"""The agg_group statement alone (issue 16): the compiled PostgreSQL statements of
workload.AGG_GROUP_PIPELINE (as written, over the declared schema, and the speculative one
the sidecar runs first) against the hand-written workload.AGG_GROUP_SQL, through asyncpg,
interleaved, best of N, on a scratch database of its own (no sidecar, no HTTP).

    .venv/bin/python -m benchmarks.aggstmt --db dbproxy_aggstmt_x [--rounds 12] [--explain]
        [--sql-file extra.sql ...]

Each extra SQL file is one more statement timed in the same rounds (a candidate rewrite);
its answer is checked against the truth like the others. ``--keep`` leaves the database."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg
import orjson

from benchmarks import pgsetup, workload
from proxy.backends.postgres.ddl import create_schema, create_table
from proxy.config import Limits
from proxy.query.aggregate.ast import View
from proxy.query.aggregate.parse import parse_pipeline
from proxy.query.aggregate.pg import compile_pipeline, compile_speculative

ADMIN = os.environ.get("DBPROXY_BENCH_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
SCHEMA = "dbproxy"
DECLARED = View(
    "bench_agg_s",
    scalars=frozenset({("cat",), ("n",), ("price",), ("ok",)}),
    numbers=frozenset({("n",), ("price",)}),
)


async def _prepare(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await create_schema(conn, SCHEMA)
        for c in ("bench_agg", "bench_agg_s"):
            table = f'{SCHEMA}."{c}"'
            await create_table(conn, table, c, 30.0, SCHEMA)
            if not await conn.fetchval(f"SELECT count(*) FROM {table}"):
                await pgsetup._seed_agg(conn, c)
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


def statements() -> dict[str, tuple[str, list[Any]]]:
    """name -> (sql, args): the hand-written one and the compiled ones."""
    p = parse_pipeline(workload.AGG_GROUP_PIPELINE, Limits())
    out: dict[str, tuple[str, list[Any]]] = {
        "hand": (workload.AGG_GROUP_SQL.format(c="bench_agg"), [])
    }
    for name, view in (("compiled", View("bench_agg")), ("declared", DECLARED)):
        table = f'{SCHEMA}."{view.collection}"'
        out[name] = compile_pipeline(
            p, view, {}, schema=SCHEMA, tables={view.collection: table}, cap=1000
        )
    # what the sidecar runs first over the undeclared collection (its values are numbers)
    speculative = compile_speculative(
        p,
        View("bench_agg"),
        {},
        schema=SCHEMA,
        tables={"bench_agg": f'{SCHEMA}."bench_agg"'},
        cap=1000,
    )
    assert speculative is not None
    out["speculative"] = speculative
    return out


def _cpu_ms(pid: int) -> float:
    """CPU time of a (local) server process so far, from the kernel's scheduler statistics:
    less disturbed by other load than wall time."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e6
    except OSError:  # the server is not on this machine
        return float("nan")


def _problems(rows: list[Any]) -> list[str]:
    items = [orjson.loads(r[0]) for r in rows]
    return workload.agg_group_problems(items, workload.agg_group_answer(workload.AGG_DOCS))


def _settings(plan_cache_mode: str) -> dict[str, str]:
    # asyncpg runs each statement as a named prepared statement: after five runs
    # PostgreSQL may switch it to a generic plan (``auto``); the option forces either
    return {"jit": "off", "plan_cache_mode": plan_cache_mode}


async def _time(
    url: str, stmts: dict[str, tuple[str, list[Any]]], rounds: int, plan_cache_mode: str
) -> None:
    conn = await asyncpg.connect(url, server_settings=_settings(plan_cache_mode))
    try:
        for name, (sql, args) in stmts.items():
            wrong = _problems(await conn.fetch(sql, *args))
            print(f"{name}: {'answer ok' if not wrong else wrong[:3]}")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        times: dict[str, list[float]] = {n: [] for n in stmts}
        cpus: dict[str, list[float]] = {n: [] for n in stmts}
        for _ in range(rounds):
            for name, (sql, args) in stmts.items():
                c0, t0 = _cpu_ms(pid), time.perf_counter()
                await conn.fetch(sql, *args)
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpus[name].append(_cpu_ms(pid) - c0)
        hand, hand_cpu = min(times["hand"]), min(cpus["hand"])
        head = f"{'statement':<24}{'best ms':>9}{'median':>9}{'hand/x':>8}"
        print(f"\n{head}{'cpu ms':>9}{'hand/x':>8}")
        for name, ts in times.items():
            best, cpu = min(ts), min(cpus[name])
            print(
                f"{name:<24}{best:>9.1f}{statistics.median(ts):>9.1f}{hand / best:>8.2f}"
                f"{cpu:>9.1f}{hand_cpu / cpu:>8.2f}"
            )
    finally:
        await conn.close()


async def _explain(url: str, stmts: dict[str, tuple[str, list[Any]]], plan_cache_mode: str) -> None:
    conn = await asyncpg.connect(url, server_settings=_settings(plan_cache_mode))
    try:
        for name, (sql, args) in stmts.items():
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
            print(f"--- {name}\n" + "\n".join(r[0] for r in rows))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.aggstmt", description=__doc__)
    ap.add_argument("--db", required=True, help="scratch database (created when missing)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--sql-file", action="append", default=[])
    ap.add_argument("--print-sql", action="store_true")
    ap.add_argument(
        "--plan-cache-mode",
        choices=("auto", "force_custom_plan", "force_generic_plan"),
        default="auto",
        help="PostgreSQL's plan_cache_mode for the timing connection",
    )
    ap.add_argument("--keep", action="store_true", help="leave the database afterwards")
    a = ap.parse_args(argv)
    url = pgsetup.with_db(ADMIN, a.db)
    exists = asyncio.run(_exists(a.db))
    if not exists:
        pgsetup.create_database(ADMIN, a.db)
    try:
        asyncio.run(_prepare(url))
        stmts = statements()
        for f in a.sql_file:
            with open(f) as fh:
                stmts[os.path.basename(f)] = (fh.read(), [])
        if a.print_sql:
            for name, (sql, args) in stmts.items():
                print(f"--- {name}\n{sql}\n{args}")
        if a.explain:
            asyncio.run(_explain(url, stmts, a.plan_cache_mode))
        asyncio.run(_time(url, stmts, a.rounds, a.plan_cache_mode))
    finally:
        if not a.keep:
            pgsetup.drop_database(ADMIN, a.db)


async def _exists(name: str) -> bool:
    conn = await asyncpg.connect(ADMIN)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
