"""Direct asyncpg client loop: the ceiling of the database itself, with no HTTP in between.

A separate process runs N concurrent asyncpg tasks (closed loop, over one pool of
``--pool-size`` connections, the same size the servers get) that issue the baseline's SQL for
a workload of ``workload.py`` for a fixed time, then prints one ``BENCH_JSON`` line: requests,
req/s, latency percentiles, errors, and its own CPU seconds and peak RSS.

    python -m benchmarks.direct --database postgresql://postgres@127.0.0.1/dbproxy_bench \
        --scenario get_uniform --tasks 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit

import asyncpg
import orjson
import uvloop

from benchmarks import search, workload
from benchmarks.load import MARKER

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SELECT = 'SELECT doc FROM dbproxy."{c}" WHERE _id = $1'
QUERY = 'SELECT doc FROM dbproxy."{c}" WHERE doc @> $1::jsonb LIMIT 10'
LIST = (
    "SELECT doc FROM dbproxy.\"{c}\" WHERE doc -> 'grp' = $1::jsonb AND doc -> 'n' >= $2::jsonb "
    "ORDER BY doc -> 'n' LIMIT 10"
)
INSERT = 'INSERT INTO dbproxy."{c}" (_id, doc, _version) VALUES ($1, $2::jsonb, 1)'
INC = (
    'UPDATE dbproxy."{c}" AS t SET doc = jsonb_set(t.doc, ARRAY[$2::text], '
    "to_jsonb(COALESCE((t.doc ->> $2::text)::numeric, 0) + $3::numeric)) "
    "|| jsonb_build_object('_version', t._version + 1), "
    "_version = t._version + 1, updated_at = now() WHERE t._id = $1 RETURNING t.doc"
)


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.missing = 0  # a read or update that found no row (the non-2xx of this client)
        self.last_error = ""


def _operation(scenario: str, collection: str, n_docs: int, seed: int):
    """A coroutine function(conn) doing one operation of the workload; returns False when
    the row was missing."""
    picker = workload.IdPicker(n_docs, scenario == "get_zipf", seed)
    rng = picker.rng
    groups = workload.n_groups(n_docs)
    select, query = SELECT.format(c=collection), QUERY.format(c=collection)
    insert, inc = INSERT.format(c=collection), INC.format(c=collection)
    base_doc = orjson.loads(
        workload.CREATE6_BODY if scenario == "create_schema6" else workload.CREATE_BODY
    )
    listing = LIST.format(c=collection)
    agg_group_sql = workload.AGG_GROUP_SQL.format(c=collection)
    agg_top_sql = workload.AGG_TOP_SQL.format(c=collection)

    async def get(conn: asyncpg.Connection) -> bool:
        return await conn.fetchval(select, picker.id()) is not None

    async def find(conn: asyncpg.Connection) -> bool:
        flt = orjson.dumps({"group": workload.group_value(rng.randrange(groups))}).decode()
        return len(await conn.fetch(query, flt)) > 0

    async def list_indexed(conn: asyncpg.Connection) -> bool:
        g, k = rng.randrange(workload.LIST_GROUPS), rng.randint(0, workload.LIST_MAX_K)
        return len(await conn.fetch(listing, str(g), str(k))) > 0

    async def create(conn: asyncpg.Connection) -> bool:
        doc_id = workload.new_id()
        doc = {**base_doc, "_id": doc_id, "_version": 1}
        await conn.execute(insert, doc_id, orjson.dumps(doc).decode())
        return True

    async def agg_group(conn: asyncpg.Connection) -> bool:
        return len(await conn.fetch(agg_group_sql)) > 0

    async def agg_memory(conn: asyncpg.Connection) -> bool:
        top = rng.random() * 100 < workload.AGG_TOP_PCT
        return len(await conn.fetch(agg_top_sql if top else agg_group_sql)) > 0

    search_sql = search.SQL.format(c=collection, limit=search.LIMIT)

    async def text_search(conn: asyncpg.Connection) -> bool:
        words = search.QUERY_WORDS
        args = search.baseline_args(f"{rng.choice(words)} {rng.choice(words)}")
        assert args is not None
        return len(await conn.fetch(search_sql, *args, search.HEADLINE, collection)) > 0

    async def mixed(conn: asyncpg.Connection) -> bool:
        if rng.random() * 100 < workload.WRITE_PCT:
            return await conn.fetchval(inc, picker.id(), "n", 1) is not None
        return await get(conn)

    ops = {
        "get_uniform": get,
        "get_zipf": get,
        "query": find,
        "create": create,
        "create_schema6": create,
        "mixed": mixed,
        "list_indexed": list_indexed,
        "agg_group": agg_group,
        "agg_group_schema": agg_group,
        "agg_memory": agg_memory,
        "search": text_search,
    }
    return ops[scenario]


async def _task(pool: asyncpg.Pool, op, deadline: float, st: _Stats) -> None:
    perf = time.perf_counter
    while perf() < deadline:  # closed loop, bounded by the deadline
        t0 = perf()
        try:
            async with pool.acquire(timeout=10) as conn:
                found = await op(conn)
        except (asyncpg.PostgresError, OSError, TimeoutError) as e:
            st.errors += 1
            st.last_error = f"{type(e).__name__}: {e}"[:300]
            await asyncio.sleep(0.01)
            continue
        st.latencies.append(perf() - t0)
        if not found:
            st.missing += 1


async def run(a: argparse.Namespace) -> dict[str, float | str]:
    pool = await asyncpg.create_pool(
        a.database, min_size=a.pool_size, max_size=a.pool_size, command_timeout=30
    )
    try:
        st = _Stats()
        # one operation per task first: prepares the statement on the connections
        warm = _operation(a.scenario, a.collection, a.n_docs, a.seed + 10_000)
        async with pool.acquire(timeout=10) as conn:
            await warm(conn)
        t0 = time.perf_counter()
        deadline = t0 + a.duration
        tasks = [
            asyncio.create_task(
                _task(
                    pool,
                    _operation(a.scenario, a.collection, a.n_docs, a.seed * 1_000_003 + i),
                    deadline,
                    st,
                )
            )
            for i in range(a.tasks)
        ]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=a.duration + 30)
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(st.latencies)
    return {
        "requests": len(lat),
        "duration_s": elapsed,
        "errors": st.errors,
        "non2xx": st.missing,
        "last_error": st.last_error,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_mb": ru.ru_maxrss / 1024,  # kilobytes on Linux
        **workload.percentiles(lat),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.direct", description=__doc__)
    p.add_argument("--database", required=True, help="the benchmark database (loopback)")
    p.add_argument("--scenario", choices=list(workload.SCENARIOS), required=True)
    p.add_argument("--collection", default="bench")
    p.add_argument("--tasks", type=int, default=64, help="concurrent tasks (closed loop)")
    p.add_argument("--pool-size", type=int, default=10)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--n-docs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if urlsplit(a.database).hostname not in LOOPBACK:
        p.error("--database must point at a loopback address")
    if not (1 <= a.tasks <= 10_000 and 1 <= a.pool_size <= 1000 and 0 < a.duration <= 3600):
        p.error("--tasks, --pool-size or --duration out of range")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out = runner.run(run(a))
    print(MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
