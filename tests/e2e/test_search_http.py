"""End to end: POST /api/db/search on the real ``dbproxy serve`` over the real PostgreSQL
and the embedded store: a declaration by migration over HTTP, ranked pages with
highlights, the refusals with their codes, one statement per search on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_aggregate_http import seed, statements
from tests.e2e.test_http_api import assert_error, call

pytestmark = pytest.mark.e2e

DOCS = [
    {"_id": "b1", "title": "Postgres full text search", "body": "ranking with weights"},
    {"_id": "b2", "title": "Cooking", "body": "search for the best <b>pasta</b> & sauce"},
    {"_id": "b3", "title": "Gardening", "body": "nothing relevant"},
]


@pytest.fixture(params=["postgresql", "sqlite"])
def server(request: pytest.FixtureRequest, launch: Callable[..., Server], pg_dsn: str) -> Server:
    if request.param == "postgresql":
        return launch("--database", pg_dsn)
    return launch()  # the embedded store in ./.dbproxy


async def declared(s: aiohttp.ClientSession, server: Server) -> str:
    name = "s_" + uuid.uuid4().hex[:8]
    await seed(s, f"{server.url}/api/db/{name}", DOCS)
    migration = {
        "id": f"{name}-search",
        "version": 1,
        "script": {
            "operations": [
                {
                    "op": "set_search",
                    "collection": name,
                    "search": {"fields": {"title": "A", "body": "C"}, "language": "english"},
                }
            ]
        },
    }
    st, data, _ = await call(s, "POST", f"{server.url}/api/db/migrations", json=migration)
    assert st == 201, data
    return name


async def test_search_ranks_highlights_and_pages(server: Server) -> None:
    url = f"{server.url}/api/db/search"
    async with aiohttp.ClientSession() as s:
        name = await declared(s, server)
        st, schema, _ = await call(s, "GET", f"{server.url}/api/db/schema/{name}")
        assert st == 200 and schema["schema"]["search"]["fields"] == {"title": "A", "body": "C"}
        body: dict[str, Any] = {"q": "search", "collections": [name], "limit": 1, "total": True}
        st, first, _ = await call(s, "POST", url, json=body)
        assert st == 200, first
        assert [i["_id"] for i in first["items"]] == ["b1"]  # the title's weight wins
        assert first["total"] == 2 and first["next"]
        assert first["items"][0]["highlights"]["title"] == (
            "Postgres full text <mark>search</mark>"
        )
        st, second, _ = await call(s, "POST", url, json={**body, "next": first["next"]})
        assert st == 200, second
        assert [i["_id"] for i in second["items"]] == ["b2"] and second["next"] is None
        marked = second["items"][0]["highlights"]["body"]
        assert "<mark>search</mark>" in marked and "&amp; sauce" in marked
        assert "<b>" not in marked  # the text's markup never comes out as markup
        assert second["items"][0]["document"]["title"] == "Cooking"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "empty_query"),
        ({"q": "   "}, 400, "empty_query"),
        ({"q": "x" * 1001}, 400, "query_too_long"),
        ({"q": "x", "collections": "notalist"}, 400, "invalid_search"),
        ({"q": "x", "collections": ["bad name!"]}, 400, "invalid_collection_name"),
        ({"q": "x", "limit": 101}, 400, "limit_too_large"),
        ({"q": "x", "limit": 0}, 400, "invalid_limit"),
        ({"q": "x", "next": "garbage"}, 400, "invalid_cursor"),
        ({"q": "x", "surprise": 1}, 400, "unknown_parameter"),
        ({"q": "x", "filter": {"$where": "1"}}, 400, "forbidden_operator"),
    ],
)
async def test_bad_requests_are_refused_with_stable_codes(
    server: Server, body: dict[str, Any], status: int, code: str
) -> None:
    async with aiohttp.ClientSession() as s:
        st, data, _ = await call(s, "POST", f"{server.url}/api/db/search", json=body)
        assert_error(st, data, status, code)


async def test_one_statement_per_search(pg_server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        name = await declared(s, pg_server)
        other = "u_" + uuid.uuid4().hex[:8]
        await seed(s, f"{pg_server.url}/api/db/{other}", [{"_id": "x", "t": "search me"}])
        body = {"q": "search", "collections": [name, other], "total": True}
        st, data, _ = await call(s, "POST", f"{pg_server.url}/api/db/search", json=body)
        assert st == 200 and data["total"] == 3, data  # the tables are known now
        before = await statements(s, pg_server)
        st, data, _ = await call(s, "POST", f"{pg_server.url}/api/db/search", json=body)
        assert st == 200 and data["total"] == 3, data
        assert await statements(s, pg_server) - before == 1


async def test_search_inside_a_transaction_sees_its_writes(server: Server) -> None:
    url = f"{server.url}/api/db/search"
    async with aiohttp.ClientSession() as s:
        name = await declared(s, server)
        st, tx, _ = await call(
            s, "POST", f"{server.url}/api/db/transaction", json={"action": "begin"}
        )
        assert st in (200, 201), tx
        inside = {"X-Transaction-Id": tx["transaction_id"]}
        new = {"_id": "t1", "title": "zebra crossing", "body": ""}
        st, _, _ = await call(s, "POST", f"{server.url}/api/db/{name}", json=new, headers=inside)
        assert st == 201
        body = {"q": "zebra", "collections": [name]}
        st, data, _ = await call(s, "POST", url, json=body, headers=inside)
        assert st == 200 and [i["_id"] for i in data["items"]] == ["t1"], data
        st, data, _ = await call(s, "POST", url, json=body)
        assert st == 200 and data["items"] == [], data
        st, _, _ = await call(
            s,
            "POST",
            f"{server.url}/api/db/transaction",
            json={"action": "rollback"},
            headers=inside,
        )
        assert st == 200
        st, data, _ = await call(s, "POST", url, json=body)
        assert st == 200 and data["items"] == [], data
