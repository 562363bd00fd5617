"""Migrations on real PostgreSQL and the embedded store: every operation, all-or-nothing,
exactly once (checksums, the lock), dependencies, resume, online indexes, dry runs, and
unique indexes enforced on writes."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.backends.base import Backend
from proxy.config import Limits
from proxy.errors import BadRequest, Conflict, DuplicateKey, NotFound, ProxyError
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.query.parse import parse_filter
from proxy.query.spec import FindSpec
from tests.backends import _CLASSES, KINDS, backend_namespace, kinds_with, open_backend

pytestmark = pytest.mark.integration
_ids = itertools.count()


def mig(*ops: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": extra.pop("id", f"m{next(_ids)}"),
        "version": 1,
        "script": {"operations": list(ops)},
        **extra,
    }


@pytest.fixture(params=kinds_with("schemas"))
async def backend(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Path
) -> AsyncIterator[Backend]:
    async with open_backend(request.param, pg_dsn, Limits(), str(tmp_path)) as b:
        yield b


@pytest.fixture
def changed() -> list[str]:
    return []


@pytest.fixture
def runner(backend: Backend, changed: list[str]) -> MigrationRunner:
    async def hook(collection: str) -> None:
        changed.append(collection)

    return MigrationRunner({"main": backend.migrations()}, "main", schemas_changed=hook)


async def run(runner: MigrationRunner, raw: dict[str, Any], **kw: Any) -> Any:
    return await runner.submit(parse_migration(raw), wait=kw.pop("wait", 30.0), **kw)


async def docs(backend: Backend, coll: str) -> list[dict[str, Any]]:
    page = await backend.find(coll, FindSpec(filter=parse_filter({}, Limits()), limit=1000))
    return [orjson.loads(d) for d in page.items]


async def stored(backend: Backend) -> dict[str, Any]:
    m = backend.migrations()
    async with m.session("t", lock=False) as s, s.transaction() as tx:
        out = {}
        for c in ("users", "orders", "items"):
            got = await tx.stored_schema(c)
            if got is not None:
                out[c] = got
        return out


USERS = {
    "fields": [
        {"name": "email", "type": "string", "required": True},
        {"name": "age", "type": "integer"},
    ]
}


# ---- every operation ---------------------------------------------------------------------


async def test_create_collection_schema_index_rename_backfill_drop(
    backend: Backend, runner: MigrationRunner, changed: list[str]
) -> None:
    out = await run(
        runner, mig({"op": "create_collection", "collection": "users", "schema": USERS})
    )
    assert out.status == 201 and out.body["status"] == "completed"
    assert changed == ["users"]
    for i in range(5):
        await backend.insert_one("users", {"_id": f"u{i}", "email": f"e{i}@x", "age": i})
    out = await run(
        runner,
        mig(
            {
                "op": "create_index",
                "collection": "users",
                "index": {"name": "by_email", "fields": ["email"], "unique": True},
            },
            {
                "op": "backfill",
                "collection": "users",
                "filter": {"age": {"$gte": 3}},
                "update": {"$set": {"old": True}},
                "batch_size": 1,
            },
            {"op": "rename_field", "collection": "users", "from": "age", "to": "years"},
        ),
    )
    assert out.status == 201, out.body
    assert out.body["progress"]["rows_done"] == 2
    rows = {d["_id"]: d for d in await docs(backend, "users")}
    assert rows["u4"]["old"] is True and "old" not in rows["u1"]
    assert rows["u4"]["years"] == 4 and "age" not in rows["u4"]
    assert rows["u4"]["_version"] == 3  # backfill and rename each bumped it
    schema = (await stored(backend))["users"]
    assert [f["name"] for f in schema[1]["fields"]] == ["email", "years"]
    assert [ix["name"] for ix in schema[1]["indexes"]] == ["by_email"]
    with pytest.raises(DuplicateKey) as err:
        await backend.insert_one("users", {"email": "e1@x"})
    assert err.value.details == {"index": "by_email"}
    out = await run(runner, mig({"op": "drop_index", "collection": "users", "name": "by_email"}))
    assert out.status == 201
    await backend.insert_one("users", {"email": "e1@x"})  # no longer unique
    out = await run(runner, mig({"op": "drop_collection", "collection": "users"}))
    assert out.status == 201
    assert await docs(backend, "users") == []
    assert "users" not in await stored(backend)


async def test_set_schema_checks_existing_documents(
    backend: Backend, runner: MigrationRunner
) -> None:
    await backend.insert_one("items", {"_id": "a", "n": 1})
    await backend.insert_one("items", {"_id": "b", "n": "two"})
    strict = {"fields": [{"name": "n", "type": "integer"}]}
    with pytest.raises(Conflict) as err:
        await run(runner, mig({"op": "set_schema", "collection": "items", "schema": strict}))
    assert err.value.code == "existing_documents_invalid"
    assert [d["_id"] for d in err.value.details["documents"]] == ["b"]
    assert "items" not in await stored(backend)
    warn = {**strict, "validation": {"level": "moderate", "action": "warn"}}
    out = await run(runner, mig({"op": "set_schema", "collection": "items", "schema": warn}))
    assert out.status == 201


async def test_backfill_must_leave_valid_documents(
    backend: Backend, runner: MigrationRunner
) -> None:
    schema = {"fields": [{"name": "n", "type": "integer"}]}
    await run(runner, mig({"op": "create_collection", "collection": "items", "schema": schema}))
    await backend.insert_one("items", {"_id": "a", "n": 1})
    with pytest.raises(Conflict) as err:
        await run(
            runner,
            mig(
                {
                    "op": "backfill",
                    "collection": "items",
                    "filter": {},
                    "update": {"$set": {"n": "x"}},
                }
            ),
        )
    assert err.value.code == "existing_documents_invalid"
    assert (await docs(backend, "items"))[0]["n"] == 1


async def test_index_over_duplicates_fails_and_leaves_nothing(
    backend: Backend, runner: MigrationRunner
) -> None:
    for i in range(3):
        await backend.insert_one("orders", {"_id": f"o{i}", "ref": "same"})
    with pytest.raises(DuplicateKey) as err:
        await run(
            runner,
            mig(
                {
                    "op": "create_index",
                    "collection": "orders",
                    "index": {"name": "by_ref", "fields": ["ref"], "unique": True},
                }
            ),
        )
    assert err.value.details == {"index": "by_ref"}
    assert "orders" not in await stored(backend)
    await backend.insert_one("orders", {"ref": "same"})  # no index left behind


async def test_unique_missing_and_null_are_one_value(
    backend: Backend, runner: MigrationRunner
) -> None:
    await run(
        runner,
        mig(
            {
                "op": "create_index",
                "collection": "orders",
                "index": {"name": "u", "fields": ["ref"], "unique": True},
            }
        ),
    )
    await backend.insert_one("orders", {"_id": "a"})
    with pytest.raises(DuplicateKey):
        await backend.insert_one("orders", {"_id": "b", "ref": None})


# ---- all or nothing, exactly once ------------------------------------------------------


async def test_third_operation_fails_nothing_of_the_first_two_stays(
    backend: Backend, runner: MigrationRunner
) -> None:
    await backend.insert_one("orders", {"_id": "x", "ref": 1})
    await backend.insert_one("orders", {"_id": "y", "ref": 1})
    raw = mig(
        {"op": "create_collection", "collection": "users", "schema": USERS},
        {"op": "rename_field", "collection": "orders", "from": "ref", "to": "reference"},
        {"op": "create_index", "collection": "items", "index": {"name": "i", "fields": ["k"]}},
        {"op": "drop_index", "collection": "items", "name": "nope"},
    )
    with pytest.raises(NotFound):
        await run(runner, raw)
    assert await stored(backend) == {}
    assert all("ref" in d for d in await docs(backend, "orders"))
    record = await runner.get(raw["id"])
    assert record["status"] == "failed" and record["error"]["code"] == "index_not_found"


async def test_checksum_noop_and_mismatch(runner: MigrationRunner) -> None:
    raw = mig({"op": "create_collection", "collection": "users"}, id="same")
    assert (await run(runner, raw)).status == 201
    again = await run(runner, raw)
    assert again.status == 200 and again.body["noop"] is True
    other = mig({"op": "create_collection", "collection": "orders"}, id="same")
    with pytest.raises(Conflict) as err:
        await run(runner, other)
    assert err.value.code == "checksum_mismatch"


async def test_dependencies(runner: MigrationRunner) -> None:
    second = mig({"op": "create_collection", "collection": "orders"}, dependencies=["first"])
    with pytest.raises(Conflict) as err:
        await run(runner, second)
    assert err.value.code == "dependency_not_met" and err.value.details == {"missing": ["first"]}
    await run(runner, mig({"op": "create_collection", "collection": "users"}, id="first"))
    assert (await run(runner, second)).status == 201
    status = await runner.status()
    assert status["counts"]["completed"] == 2 and status["current_version"] == 1


async def test_dry_run_changes_nothing(backend: Backend, runner: MigrationRunner) -> None:
    await backend.insert_one("orders", {"_id": "a", "n": 1})
    raw = mig(
        {"op": "create_index", "collection": "orders", "index": {"name": "by_n", "fields": ["-n"]}},
        {
            "op": "backfill",
            "collection": "orders",
            "filter": {"n": 1},
            "update": {"$inc": {"n": 1}},
        },
    )
    out = await run(runner, raw, dry_run=True)
    assert out.status == 200 and out.body["dry_run"] is True
    mongo = backend.migrations().dialect == "mongodb"  # the createIndexes command, as JSON
    assert ('"createIndexes"' if mongo else "CREATE INDEX") in out.body["steps"][0]["sql"]
    assert out.body["steps"][1]["documents"] == 1
    assert (await docs(backend, "orders"))[0]["n"] == 1
    with pytest.raises(NotFound):
        await runner.get(raw["id"])
    assert await stored(backend) == {}


async def test_bad_operation_is_refused_before_anything(runner: MigrationRunner) -> None:
    with pytest.raises(BadRequest) as err:
        parse_migration(mig({"op": "create_collection", "collection": "users"}, {"op": "explode"}))
    assert err.value.code == "unknown_operation"
    with pytest.raises(BadRequest) as err:
        parse_migration(
            mig(
                {
                    "op": "set_schema",
                    "collection": "users",
                    "schema": {"fields": [{"name": "a", "constraints": ["bogus"]}]},
                }
            )
        )
    assert err.value.code == "unknown_constraint"


async def test_partial_filter_inlined_or_refused(backend: Backend, runner: MigrationRunner) -> None:
    raw = mig(
        {
            "op": "create_index",
            "collection": "orders",
            "index": {
                "name": "p",
                "fields": ["ref"],
                "unique": True,
                "partial_filter": {"live": True},
            },
        }
    )
    try:
        await run(runner, raw)
    except BadRequest as err:
        assert err.code == "unsupported"
        return
    await backend.insert_one("orders", {"ref": 1, "live": False})
    await backend.insert_one("orders", {"ref": 1, "live": False})
    await backend.insert_one("orders", {"ref": 1, "live": True})
    with pytest.raises(DuplicateKey):
        await backend.insert_one("orders", {"ref": 1, "live": True})


async def test_sql_operation_postgres_only(backend: Backend, runner: MigrationRunner) -> None:
    raw = mig({"op": "sql", "sql": "CREATE TABLE IF NOT EXISTS public.mig_sql_probe (a int)"})
    if backend.migrations().dialect != "postgresql":
        with pytest.raises(BadRequest) as err:
            await run(runner, raw)
        assert err.value.code == "unsupported"
        return
    assert (await run(runner, raw)).status == 201


# ---- the lock, the background, resume --------------------------------------------------


async def test_two_runners_are_serialised(backend: Backend) -> None:
    a = MigrationRunner({"main": backend.migrations()}, "main", name="a:1")
    b = MigrationRunner({"main": backend.migrations()}, "main", name="b:2")
    for i in range(200):
        await backend.insert_one("orders", {"_id": f"o{i:04}", "n": 0})
    raw = mig(
        {
            "op": "backfill",
            "collection": "orders",
            "filter": {},
            "update": {"$inc": {"n": 1}},
            "batch_size": 10,
        }
    )
    outs = await asyncio.gather(run(a, raw), run(b, raw))
    assert sorted(o.status for o in outs) == [200, 201]
    assert {d["n"] for d in await docs(backend, "orders")} == {1}  # applied exactly once


async def test_background_answer_and_holder(backend: Backend) -> None:
    slow = MigrationRunner(
        {"main": backend.migrations()}, "main", foreground_seconds=0.0, name="h:9"
    )
    for i in range(50):
        await backend.insert_one("orders", {"_id": f"o{i:03}", "n": 0})
    raw = mig(
        {
            "op": "backfill",
            "collection": "orders",
            "filter": {},
            "update": {"$inc": {"n": 1}},
            "batch_size": 5,
        }
    )
    out = await slow.submit(parse_migration(raw), wait=0.0)
    assert out.status == 202
    for _ in range(200):
        record = await slow.get(raw["id"])
        if record["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert record["status"] == "completed" and record["progress"]["rows_done"] == 50
    assert (await slow.status())["lock_holder"] is None


async def test_interrupted_run_resumes_after_its_last_batch(pg_dsn: str, tmp_path: Path) -> None:
    """A runner killed mid-backfill (a real process, SIGKILL) leaves its record executing
    with nobody holding the lock: interrupted; re-submitting continues after the last
    committed batch, so every document is incremented exactly once (on every backend that
    declares migrations: ``Capabilities.schemas``)."""
    for kind in KINDS:
        if not _CLASSES[kind].capabilities.schemas:  # type: ignore[attr-defined]
            continue
        async with backend_namespace(kind, pg_dsn, Limits(), str(tmp_path)) as make:
            await _interrupted(kind, make, tmp_path)


async def _interrupted(kind: str, make: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    backend = make()
    await backend.start()
    try:
        for i in range(300):
            await backend.insert_one("orders", {"_id": f"o{i:04}", "n": 0})
        raw = mig(
            {
                "op": "backfill",
                "collection": "orders",
                "filter": {},
                "update": {"$inc": {"n": 1}},
                "batch_size": 3,
            },
            id=f"resume-{kind}",
        )
        script = tmp_path / f"slow_{kind}.py"
        script.write_text(_SLOW_RUNNER)
        cfg = backend.config
        args = [
            sys.executable,
            str(script),
            kind,
            cfg.connection_string,
            getattr(backend, "schema", "") or getattr(backend, "database", ""),
            orjson.dumps(raw).decode(),
        ]
        proc = subprocess.Popen(args, cwd=str(Path(__file__).parents[2]))
        runner = MigrationRunner({"main": backend.migrations()}, "main")
        for _ in range(400):
            record = await _maybe(runner, raw["id"])
            if record and (record.get("progress") or {}).get("rows_done", 0) >= 30:
                break
            await asyncio.sleep(0.05)
        proc.kill()
        proc.wait()
        for _ in range(100):  # the server notices the dead session
            record = await runner.get(raw["id"])
            if record["status"] == "interrupted":
                break
            await asyncio.sleep(0.1)
        assert record["status"] == "interrupted"
        assert 30 <= record["progress"]["rows_done"] < 300
        out = await run(runner, raw)
        assert out.status == 201 and out.body["progress"]["rows_done"] == 300
        assert {d["n"] for d in await docs(backend, "orders")} == {1}
    finally:
        await backend.close()


async def _maybe(runner: MigrationRunner, mig_id: str) -> dict[str, Any] | None:
    try:
        return await runner.get(mig_id)
    except ProxyError:
        return None


# a runner in its own process, slowed down so it can be killed mid-backfill
_SLOW_RUNNER = """
import asyncio, sys, orjson
from proxy.config import DatabaseConfig, Limits
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner

kind, dsn, schema, raw = sys.argv[1:5]

async def main():
    cfg = DatabaseConfig(name="main", type=kind, connection_string=dsn)
    if kind == "postgresql":
        from proxy.backends.postgres import PostgresBackend
        backend = PostgresBackend(cfg, Limits(), schema=schema)
    elif kind == "mongodb":
        from proxy.backends.mongo import MongoBackend
        backend = MongoBackend(cfg, Limits(), database=schema)
    else:
        from proxy.backends.sqlite import SqliteBackend
        backend = SqliteBackend(cfg, Limits(), path=dsn.split("://", 1)[1])
    await backend.start()
    runner = MigrationRunner({"main": backend.migrations()}, "main", name="slow:1")
    def progress(record):
        import time
        time.sleep(0.05)
    await runner.submit(parse_migration(orjson.loads(raw)), wait=float("inf"), progress=progress)

asyncio.run(main())
"""


async def test_concurrent_index_on_postgres(pg_dsn: str, tmp_path: Path) -> None:
    """A create_index on a non-empty PostgreSQL table is built CONCURRENTLY (outside the
    transaction), checked valid; over duplicates the invalid index is dropped."""
    async with open_backend("postgresql", pg_dsn, Limits(), str(tmp_path)) as backend:
        runner = MigrationRunner({"main": backend.migrations()}, "main")
        for i in range(20):
            await backend.insert_one("orders", {"_id": f"o{i}", "n": i, "ref": i % 2})
        raw = mig(
            {
                "op": "create_index",
                "collection": "orders",
                "index": {"name": "by_n", "fields": ["n"], "unique": True},
            }
        )
        plan = await run(runner, raw, dry_run=True)
        assert plan.body["steps"][0]["mode"] == "online"
        assert (await run(runner, raw)).status == 201
        bad = mig(
            {
                "op": "create_index",
                "collection": "orders",
                "index": {"name": "by_ref", "fields": ["ref"], "unique": True},
            }
        )
        with pytest.raises(DuplicateKey) as err:
            await run(runner, bad)
        assert err.value.details == {"index": "by_ref"}
        async with backend._conn() as conn:  # type: ignore[attr-defined]
            names = await conn.fetch(
                "SELECT c.relname, i.indisvalid FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
                backend.schema,  # type: ignore[attr-defined]
            )
        names = {r[0]: r[1] for r in names}
        assert any(n.startswith("by_n__") for n in names)
        assert not any(n.startswith("by_ref__") for n in names)
        assert all(names.values())
