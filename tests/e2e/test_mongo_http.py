"""End to end: ``dbproxy serve --database mongodb://…`` over HTTP, against the test's
MongoDB-wire server (SecantusDB in-process, or a real MongoDB at ``MONGODB_URL``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from pymongo import MongoClient

from tests.e2e.conftest import Server
from tests.e2e.test_http_api import assert_error, call
from tests.mongo_server import mongo_url

pytestmark = pytest.mark.e2e


@pytest.fixture
def mongo_server(launch: Callable[..., Server]) -> Iterator[tuple[Server, str]]:
    database = f"e2e_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(mongo_url())
    url = urlunsplit(parts._replace(path="/" + database))
    yield launch("--database", url), database
    client: MongoClient[dict[str, object]] = MongoClient(mongo_url())
    try:
        client.drop_database(database)
    finally:
        client.close()


async def test_crud_over_http_lands_in_mongodb(mongo_server: tuple[Server, str]) -> None:
    server, database = mongo_server
    base = f"{server.url}/api/db/people"
    async with aiohttp.ClientSession() as s:
        st, health, _ = await call(s, "GET", f"{server.url}/api/db/health")
        assert st == 200, health
        st, created, h = await call(s, "POST", base, json={"name": "ann", "age": 31})
        assert st == 201 and h["ETag"] == '"1"' and created["_version"] == 1
        doc_id = created["_id"]
        st, got, h = await call(s, "GET", f"{base}/{doc_id}")
        assert st == 200 and got == created and h["ETag"] == '"1"'
        st, got, h = await call(s, "PUT", f"{base}/{doc_id}", json={"$inc": {"age": 1}})
        assert st == 200 and got["age"] == 32 and h["ETag"] == '"2"'
        st, got, _ = await call(s, "PATCH", f"{base}/{doc_id}", json={"city": "Oslo", "age": None})
        assert st == 200 and got == {"_id": doc_id, "name": "ann", "city": "Oslo", "_version": 3}
        st, data, _ = await call(
            s, "PUT", f"{base}/{doc_id}", json={"x": 1}, headers={"If-Match": '"2"'}
        )
        assert_error(st, data, 412, "version_mismatch")
        st, data, _ = await call(s, "POST", base, json={"_id": doc_id})
        assert_error(st, data, 409, "duplicate_id")
        st, items, _ = await call(s, "POST", base, json=[{"_id": "b", "n": 2}, {"_id": "c"}])
        assert st == 201 and items["created"] == 2, items
        st, page, _ = await call(s, "GET", base, params={"sort": "-_id", "limit": "2"})
        assert st == 200 and [d["_id"] for d in page["items"]] == ["c", "b"] and page["next"]
        st, page, _ = await call(s, "GET", base, params={"sort": "-_id", "next": page["next"]})
        assert st == 200 and [d["_id"] for d in page["items"]] == [doc_id]
        st, counted, _ = await call(s, "GET", f"{base}/count", params={"filter": '{"n": 2}'})
        assert st == 200 and counted == {"count": 1}
        st, _, _ = await call(s, "DELETE", f"{base}/{doc_id}")
        assert st in (200, 204)
        st, data, _ = await call(s, "GET", f"{base}/{doc_id}")
        assert_error(st, data, 404, "not_found")
    # what the service sees is what MongoDB stores
    client: MongoClient[dict[str, object]] = MongoClient(mongo_url())
    try:
        stored = list(client[database]["people"].find({}, sort=[("_id", 1)]))
        assert stored == [{"_id": "b", "n": 2, "_version": 1}, {"_id": "c", "_version": 1}]
        audit = list(client[database]["_audit"].find({}, sort=[("_id", 1)]))
        assert [a["operation"] for a in audit] == ["create", "update", "patch", "create", "delete"]
    finally:
        client.close()


async def test_writes_answer_a_consistency_token_that_reads_take_back(
    mongo_server: tuple[Server, str],
) -> None:
    """Every write (and a transaction's commit) answers X-Consistency-Token: the operation
    time of its session; a read sent with it (any read preference) sees the write."""
    server, _ = mongo_server
    base = f"{server.url}/api/db/tok"
    async with aiohttp.ClientSession() as s:
        st, _, h = await call(s, "POST", base, json={"_id": "a", "n": 1})
        assert st == 201
        first = h["X-Consistency-Token"]
        assert first != "0/0" and "/" in first
        st, _, h = await call(s, "PUT", f"{base}/a", json={"$set": {"n": 2}})
        second = h["X-Consistency-Token"]
        seconds = [int(t.split("/")[0], 16) for t in (first, second)]
        incs = [int(t.split("/")[1], 16) for t in (first, second)]
        assert (seconds[1], incs[1]) > (seconds[0], incs[0])  # operation times move forward
        for preference in ("primary", "secondary", "nearest"):
            headers = {"X-Consistency-Token": second, "X-Read-Preference": preference}
            st, got, _ = await call(s, "GET", f"{base}/a", headers=headers)
            assert st == 200 and got["n"] == 2
        st, got, _ = await call(s, "GET", f"{base}/a", headers={"X-Consistency-Token": "0/0"})
        assert st == 200 and got["n"] == 2
        st, data, _ = await call(s, "GET", f"{base}/a", headers={"X-Consistency-Token": "soon"})
        assert_error(st, data, 400, "invalid_header")
        st, out, h = await call(
            s,
            "POST",
            f"{server.url}/api/db/transaction",
            json={
                "operations": [
                    {"op": "update", "collection": "tok", "id": "a", "update": {"$set": {"n": 3}}}
                ]
            },
        )
        assert st == 200, out
        assert h.get("X-Consistency-Token", "0/0") != "0/0"
