"""End to end: POST /api/db/{collection}/aggregate on the real ``dbproxy serve`` over the
real PostgreSQL and the embedded store: answers, explain, refusals, one statement each."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_http_api import assert_error, call

pytestmark = pytest.mark.e2e

SALES = [
    {"_id": "s1", "item": "abc", "price": 10, "quantity": 2},
    {"_id": "s2", "item": "jkl", "price": 20, "quantity": 1},
    {"_id": "s3", "item": "xyz", "price": 5, "quantity": 5},
    {"_id": "s4", "item": "abc", "price": 10, "quantity": 10},
    {"_id": "s5", "item": "xyz", "price": 5, "quantity": 10},
]
TOTALS = [
    {"$group": {"_id": "$item", "total": {"$sum": {"$multiply": ["$price", "$quantity"]}}}},
    {"$sort": {"total": -1}},
]


@pytest.fixture(params=["postgresql", "sqlite"])
def server(request: pytest.FixtureRequest, launch: Callable[..., Server], pg_dsn: str) -> Server:
    if request.param == "postgresql":
        return launch("--database", pg_dsn)
    return launch()  # the embedded store in ./.dbproxy


async def seed(s: aiohttp.ClientSession, base: str, docs: list[dict[str, Any]]) -> None:
    st, data, _ = await call(s, "POST", base, json=docs)
    assert st in (200, 201, 207), data


async def test_group_sort_and_lookup(server: Server) -> None:
    name, other = "agg_" + uuid.uuid4().hex[:8], "inv_" + uuid.uuid4().hex[:8]
    base = f"{server.url}/api/db/{name}"
    async with aiohttp.ClientSession() as s:
        await seed(s, base, SALES)
        await seed(s, f"{server.url}/api/db/{other}", [{"_id": "i1", "sku": "abc", "stock": 7}])
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json={"pipeline": TOTALS})
        assert st == 200, data
        assert data == {
            "items": [
                {"_id": "abc", "total": 120},
                {"_id": "xyz", "total": 75},
                {"_id": "jkl", "total": 20},
            ]
        }
        lookup = [
            {"$match": {"_id": {"$in": ["s1", "s2"]}}},
            {"$lookup": {"from": other, "localField": "item", "foreignField": "sku", "as": "inv"}},
            {
                "$project": {
                    "stock": {"$ifNull": [{"$arrayElemAt": ["$inv.stock", 0]}, 0]},
                    "n": {"$size": "$inv"},
                }
            },
        ]
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json={"pipeline": lookup})
        assert st == 200, data
        assert data["items"] == [
            {"_id": "s1", "stock": 7, "n": 1},
            {"_id": "s2", "stock": 0, "n": 0},
        ]


async def test_explain_answers_the_statement_and_its_plan(server: Server) -> None:
    base = f"{server.url}/api/db/agg_{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as s:
        await seed(s, base, SALES)
        body = {"pipeline": TOTALS, "explain": True}
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=body)
        assert st == 200, data
        assert set(data) == {"sql", "plan"} and data["sql"].lstrip().upper().startswith("WITH")
        assert "abc" not in data["sql"]  # values are bound, never in the text
        assert data["plan"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "invalid_pipeline"),
        ({"pipeline": {"$match": {}}}, "invalid_pipeline"),
        ({"pipeline": [{"$bogus": {}}]}, "unknown_operator"),
        ({"pipeline": [{"$out": "x"}]}, "forbidden_operator"),
        ({"pipeline": [{"$project": {"x": {"$function": {}}}}]}, "forbidden_operator"),
        ({"pipeline": [{"$limit": 1}] * 51}, "pipeline_too_long"),
        ({"pipeline": [{"$facet": {"a": [{"$facet": {"b": []}}]}}]}, "nested_facet"),
        ({"pipeline": [{"$addFields": {"x": {"$add": ["$a", "x"]}}}]}, "expression_failed"),
    ],
)
async def test_bad_pipelines_are_400_with_stable_codes(
    pg_server: Server, body: Any, code: str
) -> None:
    base = f"{pg_server.url}/api/db/agg_{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as s:
        await seed(s, base, [{"_id": "a", "a": 1}])
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=body)
        assert_error(st, data, 400, code)
        st, data, _ = await call(s, "GET", f"{base}/a")
        assert st == 200 and data["a"] == 1  # nothing stored is touched


async def test_one_statement_per_pipeline(pg_server: Server) -> None:
    name, other = "agg_" + uuid.uuid4().hex[:8], "inv_" + uuid.uuid4().hex[:8]
    base = f"{pg_server.url}/api/db/{name}"
    pipeline = [
        {"$match": {"price": {"$gte": 5}}},
        {"$lookup": {"from": other, "localField": "item", "foreignField": "sku", "as": "inv"}},
        {"$unwind": {"path": "$inv", "preserveNullAndEmptyArrays": True}},
        {
            "$facet": {
                "by_item": [{"$sortByCount": "$item"}],
                "top": [{"$sort": {"quantity": -1}}, {"$limit": 2}, {"$project": {"item": 1}}],
                "n": [{"$count": "n"}],
            }
        },
    ]
    async with aiohttp.ClientSession() as s:
        await seed(s, base, SALES)
        await seed(s, f"{pg_server.url}/api/db/{other}", [{"_id": "i1", "sku": "abc"}])
        body = {"pipeline": pipeline}
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=body)  # tables known now
        assert st == 200, data
        before = await statements(s, pg_server)
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=body)
        assert st == 200, data
        assert await statements(s, pg_server) - before == 1
        facet = data["items"][0]
        assert facet["n"] == [{"n": 5}]  # preserveNullAndEmptyArrays keeps the unmatched
        assert facet["by_item"][0] == {"_id": "abc", "count": 2}


async def test_speculative_statement_and_its_fallback(pg_server: Server) -> None:
    """Numeric accumulators over fields are first run taking those fields for numbers (no
    type test per value): over numbers that is the one statement; over a collection where
    one value is not a number the cast fails, the pipeline runs as written in the same
    request (the right answer, two statements), and the next request runs it as written at
    once (remembered: one statement)."""
    group = {"$group": {"_id": "$cat", "total": {"$sum": "$n"}, "max": {"$max": "$n"}}}
    body = {"pipeline": [group]}  # groups in the order of their first documents
    numbers = [{"_id": "a", "cat": "x", "n": 1}, {"_id": "b", "cat": "x", "n": 2.5}]
    mixed = [*numbers, {"_id": "c", "cat": "x", "n": "str"}, {"_id": "d", "cat": "y"}]
    async with aiohttp.ClientSession() as s:
        for docs in (numbers, mixed):
            base = f"{pg_server.url}/api/db/agg_{uuid.uuid4().hex[:8]}"
            await seed(s, base, docs)
            st, data, _ = await call(s, "POST", f"{base}/aggregate", json={**body, "explain": True})
            assert st == 200, data
            assert ("jsonb_typeof" in data["sql"]) is False  # the speculative statement
            want = [{"_id": "x", "total": 3.5, "max": 2.5}]
            if docs is mixed:  # strings sort after numbers; the missing n is no number
                want = [
                    {"_id": "x", "total": 3.5, "max": "str"},
                    {"_id": "y", "total": 0, "max": None},
                ]
            for expected_statements in (1, 1) if docs is numbers else (2, 1):
                before = await statements(s, pg_server)
                st, data, _ = await call(s, "POST", f"{base}/aggregate", json=body)
                assert st == 200, data
                assert data["items"] == want
                assert await statements(s, pg_server) - before == expected_statements
            st, data, _ = await call(s, "POST", f"{base}/aggregate", json={**body, "explain": True})
            assert st == 200, data
            assert ("jsonb_typeof" in data["sql"]) is (docs is mixed)  # as written now


async def statements(s: aiohttp.ClientSession, server: Server) -> int:
    st, data, _ = await call(s, "GET", f"{server.url}/api/db/connections")
    assert st == 200, data
    return sum(ep["statements"] for db in data.values() for ep in db["endpoints"])


async def test_aggregate_inside_a_transaction_sees_its_writes(server: Server) -> None:
    base = f"{server.url}/api/db/agg_{uuid.uuid4().hex[:8]}"
    count = {"pipeline": [{"$count": "n"}]}
    async with aiohttp.ClientSession() as s:
        await seed(s, base, SALES[:2])
        st, tx, _ = await call(
            s, "POST", f"{server.url}/api/db/transaction", json={"action": "begin"}
        )
        assert st in (200, 201), tx
        inside = {"X-Transaction-Id": tx["transaction_id"]}
        st, _, _ = await call(s, "POST", base, json={"item": "new"}, headers=inside)
        assert st == 201
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=count, headers=inside)
        assert st == 200 and data == {"items": [{"n": 3}]}, data
        st, data, _ = await call(s, "POST", f"{base}/aggregate", json=count)
        assert st == 200 and data == {"items": [{"n": 2}]}, data
        st, _, _ = await call(
            s,
            "POST",
            f"{server.url}/api/db/transaction",
            json={"action": "rollback"},
            headers=inside,
        )
        assert st == 200
