"""The async Python client (``proxy.client``) against a live ``dbproxy serve`` on PostgreSQL:
CRUD, operators, find across pages, count, aggregate, search, transactions, If-Match,
idempotency keys, errors by status, the consistency token; and it imports no server code."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from proxy.client import (
    Client,
    DbProxyError,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


def name() -> str:
    return f"c{uuid.uuid4().hex[:12]}"


def test_importing_the_client_imports_no_server_code() -> None:
    code = (
        "import sys, proxy.client\n"
        "bad = [m for m in ('aiohttp.web', 'asyncpg', 'proxy.pipeline', 'proxy.http',"
        " 'proxy.backends', 'redis', 'sqlite3') if m in sys.modules]\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


async def test_documents_round_trip(pg_server: Server) -> None:
    async with Client(pg_server.url) as db:
        users = db.collection(name())
        ann = await users.create({"name": "ann", "age": 31})
        assert ann["_version"] == 1 and ann["name"] == "ann"
        assert (await users.get(ann["_id"]))["age"] == 31
        bumped = await users.update(ann["_id"], {"$inc": {"age": 1}})
        assert bumped["age"] == 32 and bumped["_version"] == 2
        patched = await users.patch(ann["_id"], {"city": "Rome"}, if_match=2)
        assert patched["city"] == "Rome"
        with pytest.raises(PreconditionFailed) as stale:
            await users.replace(ann["_id"], {"name": "x"}, if_match=1)
        assert stale.value.status == 412 and stale.value.code == "version_mismatch"
        assert stale.value.request_id and not stale.value.retryable
        replaced = await users.replace(ann["_id"], {"name": "ann", "age": 40})
        assert "city" not in replaced
        projected = await users.get(ann["_id"], fields=["name"])
        assert projected["name"] == "ann" and "age" not in projected
        deleted = await users.delete(ann["_id"])
        assert deleted["deleted"] is True
        with pytest.raises(NotFound) as gone:
            await users.get(ann["_id"])
        assert isinstance(gone.value, DbProxyError) and gone.value.code == "not_found"


async def test_find_follows_next_count_and_aggregate(pg_server: Server) -> None:
    async with Client(pg_server.url) as db:
        items = db.collection(name())
        bulk = await items.create_many([{"_id": f"i{n:03d}", "n": n} for n in range(25)])
        assert bulk["created"] == 25 and bulk["failed"] == 0
        seen = [d["n"] async for d in items.find({"n": {"$gte": 5}}, sort="n", page_size=7)]
        assert seen == list(range(5, 25))  # three pages and a bit
        top = [d async for d in items.find(sort="-n", limit=3, fields="n", page_size=2)]
        assert [d["n"] for d in top] == [24, 23, 22]
        assert await items.count({"n": {"$lt": 10}}) == 10
        assert await items.count() == 25
        groups = await items.aggregate([{"$group": {"_id": None, "total": {"$sum": "$n"}}}])
        assert groups == [{"_id": None, "total": sum(range(25))}]


async def test_search(pg_server: Server) -> None:
    async with Client(pg_server.url) as db:
        notes = name()
        await db.collection(notes).create({"_id": "a", "text": "the quick brown fox"})
        await db.collection(notes).create({"_id": "b", "text": "a lazy dog"})
        found = await db.search("fox", collections=[notes])
        assert [hit["_id"] for hit in found["items"]] == ["a"]


async def test_transactions_commit_and_roll_back(pg_server: Server) -> None:
    async with Client(pg_server.url) as db:
        coll = name()
        async with db.transaction() as tx:
            await tx.collection(coll).create({"_id": "kept", "v": 1})
        assert (await db.collection(coll).get("kept"))["v"] == 1
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                await tx.collection(coll).create({"_id": "dropped"})
                assert (await tx.collection(coll).get("dropped"))["_id"] == "dropped"
                raise RuntimeError("abandon")
        with pytest.raises(NotFound):
            await db.collection(coll).get("dropped")


async def test_idempotency_keys_and_the_consistency_token(pg_server: Server) -> None:
    async with Client(pg_server.url) as db:
        orders = db.collection(name())
        key = f"order-{uuid.uuid4().hex}"  # keys are the service's: one no other test uses
        first = await orders.create({"total": 5}, idempotency_key=key)
        again = await orders.create({"total": 5}, idempotency_key=key)
        assert again == first  # replayed, not written twice
        assert await orders.count() == 1
        with pytest.raises(Unprocessable) as reused:
            await orders.create({"total": 6}, idempotency_key=key)
        assert reused.value.code == "idempotency_key_reused"
        # without replicas no write hands out a token; one the client holds goes with reads
        assert db.consistency_token is None
        db.consistency_token = "not-a-token"
        with pytest.raises(DbProxyError) as sent:
            await orders.count()
        assert sent.value.status == 400 and sent.value.code == "invalid_header"
        db.consistency_token = "0/0"
        assert await orders.count() == 1


async def test_retryable_errors_are_retried_then_raised(launch: Callable[..., Server]) -> None:
    """A database that is down: 503 database_unavailable, retried with backoff, then raised
    with its status, code and retryable flag."""
    server = launch("--database", "postgresql://postgres@127.0.0.1:1/nothing")
    async with Client(server.url, retries=2, backoff=0.01) as db:
        with pytest.raises(DbProxyError) as down:
            await db.collection("things").create({"a": 1})
    assert down.value.status == 503 and down.value.retryable
    assert down.value.code == "database_unavailable"


def readme_client_example() -> str:
    """The README's client example: the ```python block of its OpenAPI and client section."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## OpenAPI and the Python client") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


async def test_the_readmes_client_example_runs(pg_server: Server) -> None:
    scope: dict[str, object] = {}
    exec(compile(readme_client_example(), "README.md", "exec"), scope)
    main = scope["main"]
    assert callable(main)
    await main(pg_server.url)
    async with Client(pg_server.url) as db:
        users = db.collection("readme_client_users")
        assert [u["age"] async for u in users.find()] == [32]
