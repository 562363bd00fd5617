"""What is MongoDB's own in aggregation: one ``aggregate`` command per pipeline, its explain,
a pipeline inside a transaction, and full-text search left undeclared (SecantusDB has none)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from proxy import context
from proxy.backends.base import Backend
from proxy.backends.mongo import MongoBackend
from proxy.config import Limits
from proxy.query.aggregate.ast import AggregateSpec, View
from proxy.query.aggregate.parse import parse_body
from tests.backends import open_backend
from tests.mongo_server import mongo_url, server_name

pytestmark = pytest.mark.integration


@pytest.fixture
async def backend(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend("mongodb", pg_dsn, Limits(), str(tmp_path)) as b:
        yield b


def spec(pipeline: list[Any], *, explain: bool = False) -> AggregateSpec:
    parsed, _ = parse_body({"pipeline": pipeline}, Limits())
    views = tuple(View(n) for n in parsed.lookups)
    return AggregateSpec(parsed, View("orders"), views, 100, explain)


async def test_one_command_and_the_servers_explain(backend: Backend) -> None:
    await backend.insert_many("orders", [{"_id": "a", "n": 1}, {"_id": "b", "n": 2}])
    pipeline = [{"$match": {"n": {"$gte": 2}}}, {"$group": {"_id": None, "t": {"$sum": "$n"}}}]
    result = await backend.aggregate("orders", spec(pipeline))
    assert [orjson.loads(b) for b in result.items] == [{"_id": None, "t": 2}]
    assert context.last_statement.get() == ("mongodb aggregate", ("orders",))
    explained = await backend.aggregate("orders", spec(pipeline, explain=True))
    assert explained.items == [] and explained.explain is not None
    assert explained.explain["pipeline"][0] == {"$match": {"n": {"$gte": 2}}}
    assert explained.explain["plan"]  # the server's queryPlanner answer, as JSON values
    orjson.dumps(explained.explain)


async def test_a_pipeline_inside_a_transaction_sees_its_writes(backend: Backend) -> None:
    tx = await backend.begin()
    try:
        await tx.insert_one("orders", {"_id": "t1", "n": 5})
        result = await tx.aggregate("orders", spec([{"$count": "n"}]))
        assert [orjson.loads(b) for b in result.items] == [{"n": 1}]
    finally:
        await tx.rollback()


async def test_search_is_not_declared_because_the_server_has_no_text_index() -> None:
    assert MongoBackend.capabilities.aggregate is True
    assert MongoBackend.capabilities.search is False
    if server_name() != "secantus":
        pytest.skip("recorded for SecantusDB; a real MongoDB has text indexes")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url())
    try:
        coll = client["dbproxy_textprobe"]["docs"]
        with pytest.raises(OperationFailure) as info:
            await coll.create_index([("body", "text")])
        assert info.value.code == 67  # CannotCreateIndex: "text indexes are not supported"
        with pytest.raises(OperationFailure):
            await coll.find({"$text": {"$search": "x"}}).to_list()
    finally:
        await client.drop_database("dbproxy_textprobe")
        await client.close()


async def test_a_failing_constant_fails_before_any_document(backend: Backend) -> None:
    """MongoDB folds constant sub-expressions when it optimises a pipeline: a constant that
    cannot be evaluated fails over no input too (the reference evaluates per document and
    gives []); the differential test sets such examples aside."""
    from proxy.errors import InvalidQuery

    pipeline = [{"$match": {"nope": 1}}, {"$set": {"n": {"$toInt": "x"}}}]
    with pytest.raises(InvalidQuery) as info:
        await backend.aggregate("orders", spec(pipeline))
    assert info.value.code == "expression_failed"
    assert (info.value.details or {}).get("when") == "optimising"
