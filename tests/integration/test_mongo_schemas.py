"""MongoDB schemas against the test server (SecantusDB, or MONGODB_URL): the migration's
index serves a find (explain), describe_collection, and partitioning refused off a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.backends.migrations import physical_index_name
from proxy.config import Limits
from proxy.errors import BadRequest
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from tests.backends import open_backend

pytestmark = pytest.mark.integration


@pytest.fixture
async def backend(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Any]:
    async with open_backend("mongodb", pg_dsn, Limits(), str(tmp_path)) as b:
        yield b


async def _run(backend: Any, mig_id: str, *ops: dict[str, Any]) -> Any:
    runner = MigrationRunner({"main": backend.migrations()}, "main")
    raw = {"id": mig_id, "version": 1, "script": {"operations": list(ops)}}
    return await runner.submit(parse_migration(raw), wait=30.0)


async def test_index_is_real_and_described(backend: Any) -> None:
    for i in range(20):
        await backend.insert_one("orders", {"_id": f"o{i:02}", "grp": i % 4, "n": i})
    index = {"name": "by_grp_n", "fields": ["grp", "-n"]}
    out = await _run(backend, "ix", {"op": "create_index", "collection": "orders", "index": index})
    assert out.status == 201
    physical = physical_index_name("orders", "by_grp_n")
    plan = await backend.db.command(
        {"explain": {"find": "orders", "filter": {"grp": 1}}, "verbosity": "queryPlanner"}
    )
    assert physical in str(plan["queryPlanner"]["winningPlan"])
    about = await backend.describe_collection("orders", 3)
    assert about["exists"] and about["estimated_count"] == 20 and len(about["sample"]) == 3
    assert [ix["physical_name"] for ix in about["indexes"]] == [physical]
    assert (await backend.load_schemas())["orders"][1]["indexes"][0]["name"] == "by_grp_n"


@pytest.mark.parametrize("strategy", ["hash", "range", "list", "time"])
async def test_partitioning_refused_off_a_sharded_cluster(backend: Any, strategy: str) -> None:
    spec: dict[str, Any] = {
        "hash": {"strategy": "hash", "key": "t", "partitions": 4},
        "range": {"strategy": "range", "key": "t", "bounds": ["m"]},
        "list": {"strategy": "list", "key": "t", "values": {"a": ["x"]}},
        "time": {"strategy": "time", "key": "t", "interval": "month"},
    }[strategy]
    op = {"op": "create_collection", "collection": "parts", "schema": {"partitioning": spec}}
    with pytest.raises(BadRequest) as err:
        await _run(backend, f"p-{strategy}", op)
    assert err.value.code == "unsupported_by_backend"
    reason = "strategy" if strategy in ("list", "time") else "not_sharded_cluster"
    assert err.value.details["reason"] == reason
    assert "parts" not in await backend.load_schemas()
    assert "parts" not in await backend.db.list_collection_names()  # the creation undone


async def test_server_validator_follows_the_declared_schema(backend: Any) -> None:
    """The $jsonSchema validator (types, required) refuses a write that bypasses the
    sidecar; removing the schema (drop of its fields) removes it."""
    from pymongo.errors import WriteError

    schema = {"fields": [{"name": "n", "type": "integer", "required": True}]}
    op = {"op": "create_collection", "collection": "vals", "schema": schema}
    assert (await _run(backend, "v1", op)).status == 201
    await backend.insert_one("vals", {"_id": "ok", "n": 2.0})  # numeric passes the server
    with pytest.raises(WriteError) as err:
        await backend.db["vals"].insert_one({"_id": "raw", "n": "x"})
    assert err.value.code == 121
    with pytest.raises(WriteError):
        await backend.db["vals"].insert_one({"_id": "raw2"})
    relaxed = {"op": "set_schema", "collection": "vals", "schema": {"fields": []}}
    assert (await _run(backend, "v2", relaxed)).status == 201
    await backend.db["vals"].insert_one({"_id": "raw3", "n": "x"})
