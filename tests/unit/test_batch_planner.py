"""The batch planner (every operation checked before any work, what each is charged) and
runner (references to earlier results), the runner on the embedded store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from proxy.backends.sqlite import SqliteBackend
from proxy.config import Config, DatabaseConfig, Limits
from proxy.errors import BadRequest, LimitExceeded
from proxy.pipeline.batch import charges, parse_batch
from proxy.pipeline.core import Core


def test_every_operation_is_checked_before_any_work() -> None:
    ok = {"op": "create", "collection": "c", "document": {}}
    with pytest.raises(BadRequest) as info:
        parse_batch({"operations": [ok, {"op": "get", "collection": "c"}]}, 10)
    assert info.value.details == {"operation": 1}
    with pytest.raises(BadRequest) as extra:
        parse_batch({"operations": [{**ok, "id": "x"}]}, 10)
    assert "does not take id" in extra.value.message
    with pytest.raises(LimitExceeded):
        parse_batch({"operations": [ok] * 11}, 10)
    with pytest.raises(BadRequest) as iso:
        parse_batch({"operations": [ok], "isolation": "chaos"}, 10)
    assert iso.value.code == "invalid_isolation"
    plan = parse_batch({"operations": [ok], "isolation": "serializable"}, 10)
    assert plan.isolation == "serializable" and plan.operations == [ok]


def test_each_operation_is_charged_as_what_it_is() -> None:
    ops = [
        {"op": "create", "collection": "c", "document": {}},
        {"op": "query", "collection": "c", "limit": 250},
        {"op": "query", "collection": "c"},
        {"op": "patch", "collection": "c", "id": "a", "patch": {}},
    ]
    assert charges(ops, default_limit=50) == [
        ("create", 0),
        ("list", 250),
        ("list", 50),
        ("update", 0),
    ]


@pytest.fixture
async def core(tmp_path: Any) -> AsyncIterator[Core]:
    path = os.path.join(tmp_path, "store.sqlite3")
    db = DatabaseConfig(name="main", type="sqlite", connection_string=f"sqlite://{path}")
    backend = SqliteBackend(db, Limits(), path=path)
    await backend.start()
    try:
        yield Core(Config(), {"main": backend}, "main")
    finally:
        await backend.close()


async def test_references_resolve_from_earlier_results(core: Core) -> None:
    results = await core.run_batch(
        {
            "operations": [
                {"op": "create", "collection": "c", "document": {"name": "a", "n": 1}},
                {"op": "create", "collection": "d", "document": {"of": {"$ref": 0}}},
                {
                    "op": "update",
                    "collection": "c",
                    "id": {"$ref": 0},
                    "update": {"$inc": {"n": {"$ref": [0, "n"]}}},
                },
            ]
        }
    )
    first, second, third = (r["document"] for r in orjson.loads(orjson.dumps(results)))
    assert second["of"] == first["_id"]
    assert third["n"] == 2 and third["_version"] == 2


async def test_a_failing_operation_rolls_back_and_names_its_index(core: Core) -> None:
    with pytest.raises(BadRequest) as info:
        await core.run_batch(
            {
                "operations": [
                    {"op": "create", "collection": "c", "document": {"_id": "x"}},
                    {"op": "create", "collection": "c", "document": {"k": {"$ref": 5}}},
                ]
            }
        )
    assert info.value.code == "invalid_reference"
    assert info.value.message.startswith("operation 1:")
    assert await core.count("c", None) == 0
