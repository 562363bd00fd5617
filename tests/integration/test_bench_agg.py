"""The aggregation benchmark's data and hand-written SQL (benchmarks/, issue 16): the seeded
documents are workload.agg_doc, the baseline's SQL gives the answers the harness checks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from benchmarks import pgsetup, workload
from tests.conftest import PG_ADMIN_DSN


@pytest.fixture
def bench_db() -> Iterator[str]:
    name = f"dbproxy_test_bagg_{uuid.uuid4().hex[:10]}"
    pgsetup.create_database(PG_ADMIN_DSN, name)
    try:
        url = pgsetup.with_db(PG_ADMIN_DSN, name)
        pgsetup.create_tables(url, ["bench_agg", "bench_agg_big"])
        yield url
    finally:
        pgsetup.drop_database(PG_ADMIN_DSN, name)


async def _load_and_read(url: str, n_big: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await pgsetup._seed_agg(conn, "bench_agg")
        await pgsetup._seed_agg_big(conn, n_big)
        big = workload.AGG_TOP_SQL.format(c="bench_agg_big")
        return {
            "big_rows": await conn.fetch(
                'SELECT _id, doc::text AS doc, _version FROM dbproxy."bench_agg_big" ORDER BY _id'
            ),
            "big_indexes": await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'dbproxy' "
                "AND tablename = 'bench_agg_big'"
            ),
            "count": await conn.fetchval('SELECT count(*) FROM dbproxy."bench_agg"'),
            "sample": await conn.fetchval(
                "SELECT doc::text FROM dbproxy.\"bench_agg\" WHERE _id = 'a-0012345'"
            ),
            "group": await conn.fetch(workload.AGG_GROUP_SQL.format(c="bench_agg")),
            "group_big": await conn.fetch(workload.AGG_GROUP_SQL.format(c="bench_agg_big")),
            "top_big": await conn.fetch(big),
        }
    finally:
        await conn.close()


def test_seeded_documents_and_the_hand_written_sql_agree_with_the_workload(
    bench_db: str,
) -> None:
    n_big = 3000
    got = asyncio.run(_load_and_read(bench_db, n_big))
    # bench_agg: COPY of agg_doc(1..AGG_DOCS)
    assert got["count"] == workload.AGG_DOCS
    assert orjson.loads(str(got["sample"])) == workload.agg_doc(12345)
    # bench_agg_big: built in SQL (AGG_DOC_SQL) -- the same documents as agg_doc, row by row
    rows = got["big_rows"]
    assert len(rows) == n_big
    for i, r in enumerate(rows, start=1):
        want = workload.agg_doc(i)
        assert (r["_id"], r["_version"]) == (want["_id"], 1)
        doc = orjson.loads(r["doc"])
        assert doc == want
        assert isinstance(doc["price"], float) and isinstance(doc["n"], int)
    assert got["big_indexes"] == 2  # the primary key and the GIN index, built again
    # the baseline's $group SQL: the truth computed in Python, as a set of groups
    for key, n in (("group", workload.AGG_DOCS), ("group_big", n_big)):
        items = [orjson.loads(r[0]) for r in got[key]]
        assert len(items) == workload.AGG_GROUPS
        assert workload.agg_group_problems(items, workload.agg_group_answer(n)) == []
    # the baseline's $sort + $limit SQL: price descending, ties in _id order
    top = [orjson.loads(r[0])["_id"] for r in got["top_big"]]
    assert top == workload.agg_top_answer(n_big)
    assert len(top) == workload.AGG_TOP_LIMIT


def test_group_answers_are_compared_as_sets_with_a_numeric_tolerance() -> None:
    want = workload.agg_group_answer(600)
    items: list[dict[str, Any]] = [{"_id": k, **v} for k, v in reversed(list(want.items()))]
    assert workload.agg_group_problems(items, want) == []
    close = [{**it, "avg": it["avg"] * (1 + 1e-12)} for it in items]
    assert workload.agg_group_problems(close, want) == []
    off = [{**items[0], "total": items[0]["total"] + 1}, *items[1:]]
    assert workload.agg_group_problems(off, want) == [
        f"group {items[0]['_id']}: total = {items[0]['total'] + 1}, expected {items[0]['total']}"
    ]
    assert "groups" in workload.agg_group_problems(items[1:], want)[0]
    assert workload.agg_group_problems([*items, items[0]], want) == [
        f"group {items[0]['_id']!r} answered twice"
    ]
    assert workload.agg_group_problems({"x": 1}, want) == ["items is not a list: {'x': 1}"]
