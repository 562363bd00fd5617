"""A statement seen to run long is planned for its values on each later run (the
connection's unnamed statement), not run from asyncpg's cache of named statements, whose
plans PostgreSQL makes generic after five runs. Real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from proxy.backends.postgres import PostgresBackend
from proxy.backends.postgres.errors import translate
from proxy.backends.postgres.execute import LONG_RUN_MS, Executor
from proxy.backends.postgres.pool import EndpointSet
from proxy.config import DatabaseConfig, Limits, PoolSettings
from proxy.query.aggregate.ast import AggregateSpec, View
from proxy.query.aggregate.parse import parse_body
from proxy.query.parse import parse_filter
from proxy.query.spec import FindSpec
from tests.backends import open_backend

pytestmark = pytest.mark.integration

# the marker tells this test's statements apart in pg_prepared_statements
SLEEP = "SELECT pg_sleep($1::float8) AS slept, $2::int AS n /* long-runs-test */"


async def _executor(dsn: str, limits: Limits) -> Executor:
    cfg = DatabaseConfig(
        name="main",
        type="postgresql",
        connection_string=dsn,
        pool_settings=PoolSettings(min_connections=1, max_connections=1, timeout_seconds=2),
    )
    eps = EndpointSet(cfg, limits)
    eps.primary.pool = await eps.open_pool(eps.primary)
    return Executor(eps, limits, 2.0)


async def _run(ex: Executor, sleep: float, n: int) -> int:
    ep = ex.endpoints.choose("read", None, None)
    rows = await ex.run_on(ep, SLEEP, (sleep, n), analytic=True)
    return int(rows[0]["n"])


async def _named_runs(ex: Executor) -> int:
    """How often the test's statement ran as a named (cached) prepared statement on the
    pool's one connection."""
    ep = ex.endpoints.primary
    assert ep.pool is not None
    async with ep.pool.acquire() as conn:
        got = await conn.fetchval(
            "SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
            " WHERE statement = $1",
            SLEEP,
        )
    return int(got)


async def test_a_long_statement_is_then_planned_for_its_values(pg_dsn: str) -> None:
    ex = await _executor(pg_dsn, Limits())
    try:
        assert await _run(ex, 0.001, 1) == 1  # short: the cache keeps it
        assert SLEEP not in ex.long_runs
        assert await _named_runs(ex) == 1
        assert await _run(ex, LONG_RUN_MS / 1000 + 0.01, 2) == 2  # long: remembered
        assert SLEEP in ex.long_runs
        assert await _named_runs(ex) == 2
        for n in range(3, 10):  # planned per run: the named statement runs no more
            assert await _run(ex, LONG_RUN_MS / 1000 + 0.005, n) == n
        assert await _named_runs(ex) == 2
        assert SLEEP in ex.long_runs
        # quick again (it was slow only while the server was busy): back to the cache
        assert await _run(ex, 0.0, 10) == 10
        assert SLEEP not in ex.long_runs
        assert await _run(ex, 0.0, 11) == 11
        assert await _named_runs(ex) == 3
    finally:
        pool = ex.endpoints.primary.pool
        assert pool is not None
        pool.terminate()


async def test_the_statement_timeout_still_holds_for_a_planned_run(pg_dsn: str) -> None:
    ex = await _executor(pg_dsn, Limits(statement_timeout_seconds=0.5))
    try:
        await _run(ex, LONG_RUN_MS / 1000 + 0.01, 1)
        assert SLEEP in ex.long_runs
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError) as caught:
            await _run(ex, 5.0, 2)
        assert time.monotonic() - started < 1.5
        assert translate(caught.value).code == "statement_timeout"
        assert await _run(ex, 0.0, 3) == 3  # the connection is usable after the cancel
    finally:
        pool = ex.endpoints.primary.pool
        assert pool is not None
        pool.terminate()


async def test_bad_arguments_on_a_planned_run_fail_as_on_a_cached_one(pg_dsn: str) -> None:
    ex = await _executor(pg_dsn, Limits())
    try:
        await _run(ex, LONG_RUN_MS / 1000 + 0.01, 1)
        assert SLEEP in ex.long_runs
        ep = ex.endpoints.choose("read", None, None)
        with pytest.raises(asyncpg.DataError):
            await ex.run_on(ep, SLEEP, (0.0, "not a number"), analytic=True)
        assert await _run(ex, 0.0, 4) == 4
    finally:
        pool = ex.endpoints.primary.pool
        assert pool is not None
        pool.terminate()


async def test_only_aggregations_are_remembered(pg_dsn: str) -> None:
    """A short statement that ran long only because the server was busy would pay for
    planning on every run: only analytic statements (aggregations) are remembered."""
    ex = await _executor(pg_dsn, Limits())
    try:
        ep = ex.endpoints.choose("read", None, None)
        await ex.run_on(ep, SLEEP, (LONG_RUN_MS / 1000 + 0.01, 1))
        assert SLEEP not in ex.long_runs and len(ex.long_runs) == 0
    finally:
        pool = ex.endpoints.primary.pool
        assert pool is not None
        pool.terminate()


async def test_the_backend_plans_its_aggregations_not_its_finds(
    pg_dsn: str, tmp_path: Path
) -> None:
    limits = Limits()
    async with open_backend("postgresql", pg_dsn, limits, str(tmp_path)) as backend:
        assert isinstance(backend, PostgresBackend)
        ex = backend._exec
        ex.long_run_ms = 0.0  # every run counts as long
        docs = [{"_id": f"d{i}", "cat": "ab"[i % 2], "n": i, "ok": i % 3 > 0} for i in range(60)]
        await backend.insert_many("orders", docs)
        pipeline = [
            {"$match": {"ok": True}},
            {"$group": {"_id": "$cat", "total": {"$sum": "$n"}, "top": {"$max": "$n"}}},
            {"$sort": {"_id": 1}},
        ]
        parsed, _ = parse_body({"pipeline": pipeline}, limits)
        spec = AggregateSpec(parsed, View("orders"), (), 100)
        want = [
            {
                "_id": c,
                "total": sum(d["n"] for d in docs if d["ok"] and d["cat"] == c),
                "top": max(d["n"] for d in docs if d["ok"] and d["cat"] == c),
            }
            for c in "ab"
        ]
        first = await backend.aggregate("orders", spec)
        assert [orjson.loads(x) for x in first.items] == want
        assert len(ex.long_runs) == 1  # the aggregation's statement, remembered
        for _ in range(7):  # planned for its values now, past the five runs of a cache
            again = await backend.aggregate("orders", spec)
            assert [orjson.loads(x) for x in again.items] == want
        assert len(ex.long_runs) == 1
        page = await backend.find("orders", FindSpec(filter=parse_filter({"ok": True}, limits)))
        assert len(page.items) == 40
        assert len(ex.long_runs) == 1  # the find was not remembered
