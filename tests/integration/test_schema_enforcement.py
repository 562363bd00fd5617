"""Collection schemas enforced on every write path, on every backend, through the pipeline:
create, bulk, replace, merge patch, update operators (the document as it would be after
the update), upserts, batches and interactive transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from proxy.backends.base import Backend
from proxy.config import Limits
from proxy.errors import DuplicateKey, NotFound, PreconditionFailed, SchemaViolation
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline.core import Core
from proxy.query.spec import ItemResult, WriteResult
from tests.backends import backend_namespace, core_over, kinds_with, open_core

pytestmark = pytest.mark.integration

SCHEMA: dict[str, Any] = {
    "fields": [
        {
            "name": "email",
            "type": "string",
            "required": True,
            "constraints": ["pattern:^[^@]+@[^@]+$", "max_length:80"],
        },
        {"name": "age", "type": "integer", "constraints": ["min:0", "max:150"]},
        {
            "name": "role",
            "type": "string",
            "default_value": "member",
            "constraints": ["enum:member|admin"],
        },
        {"name": "tags", "type": "array"},
        {"name": "address", "type": ["object", "null"]},
        {"name": "address.city", "type": "string", "required": True},
        {"name": "created", "type": "datetime", "constraints": ["immutable"]},
    ]
}


async def declare(core: Core, collection: str, schema: dict[str, Any], version: int = 1) -> None:
    """Store ``schema`` as a migration would (the _schemas row) and reload it."""
    backend: Any = core.backend()
    text = orjson.dumps({"name": collection, **schema}).decode()
    if backend.capabilities.schemas and hasattr(backend, "path"):
        with sqlite3.connect(backend.path) as conn:
            conn.execute(
                "INSERT INTO _schemas (collection, schema, version) VALUES (?1, ?2, ?3) "
                "ON CONFLICT (collection) DO UPDATE SET schema = ?2, version = ?3",
                (collection, text, version),
            )
    elif hasattr(backend, "database"):  # MongoDB: the _schemas collection
        await backend.db["_schemas"].update_one(
            {"_id": collection},
            {"$set": {"schema": text, "version": version}},
            upsert=True,
        )
    else:
        async with backend._conn() as conn:
            await conn.execute(
                f'INSERT INTO "{backend.schema}"._schemas (collection, schema, version) '
                "VALUES ($1, $2::jsonb, $3) ON CONFLICT (collection) "
                "DO UPDATE SET schema = $2::jsonb, version = $3",
                collection,
                text,
                version,
            )
    await core.refresh_schemas()


@pytest.fixture(params=kinds_with("schemas"))
async def core(request: pytest.FixtureRequest, pg_dsn: str, tmp_path: Any) -> AsyncIterator[Core]:
    async with open_core(request.param, pg_dsn, Limits(), str(tmp_path)) as c:
        await c.create("users", {"_id": "seed", "email": "s@x"})  # the table exists
        await c.delete("users", "seed")
        await declare(c, "users", SCHEMA)
        yield c


def body(result: WriteResult) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(result.body)
    return value


async def stored(core: Core, doc_id: str) -> dict[str, Any] | None:
    try:
        return body(await core.get("users", doc_id))
    except NotFound:
        return None


def rules(err: SchemaViolation) -> set[tuple[str, str]]:
    return {(p["path"], p["rule"]) for p in err.details["problems"]}


# ---- create and bulk --------------------------------------------------------------------


async def test_create_fills_defaults_and_refuses_every_problem(core: Core) -> None:
    made = body(await core.create("users", {"_id": "a", "email": "a@x", "age": 30}))
    assert made["role"] == "member"  # the default, filled in on create
    with pytest.raises(SchemaViolation) as err:
        await core.create(
            "users", {"_id": "b", "email": "nope", "age": -1, "role": "king", "tags": "x"}
        )
    assert err.value.status == 400 and err.value.code == "schema_violation"
    assert {("email", "pattern"), ("age", "min"), ("role", "enum"), ("tags", "type")} <= rules(
        err.value
    )
    assert await stored(core, "b") is None  # nothing written
    with pytest.raises(SchemaViolation) as err:
        await core.create("users", {"_id": "c", "age": 3})
    assert ("email", "required") in rules(err.value)
    with pytest.raises(SchemaViolation) as err:
        await core.create("users", {"_id": "d", "email": "d@x", "address": {"zip": "1"}})
    assert ("address.city", "required") in rules(err.value)
    with pytest.raises(SchemaViolation) as err:
        await core.create("users", {"_id": "e", "email": "e@x", "created": "yesterday"})
    assert ("created", "type") in rules(err.value) or ("created", "format") in rules(err.value)
    ok = await core.create("users", {"_id": "f", "email": "f@x", "created": "2026-12-02T10:00:00Z"})
    assert isinstance(ok, WriteResult)


async def test_bulk_create_reports_each_invalid_item_and_writes_the_rest(core: Core) -> None:
    results = await core.create(
        "users",
        [{"_id": "1", "email": "1@x"}, {"_id": "2", "email": 2}, {"_id": "3", "email": "3@x"}],
    )
    assert isinstance(results, list)
    assert [r.status for r in results] == [201, 400, 201]
    bad = results[1]
    assert isinstance(bad, ItemResult) and bad.error is not None
    assert bad.error["code"] == "schema_violation"
    assert bad.error["details"]["problems"][0]["path"] == "email"
    assert await stored(core, "2") is None and (await stored(core, "3") or {})["role"] == "member"


# ---- replace, patch, update operators -----------------------------------------------------


async def test_replace_patch_and_operators_are_checked_on_the_result(core: Core) -> None:
    await core.create("users", {"_id": "u", "email": "u@x", "age": 10})
    before = await stored(core, "u")
    attempts: list[Any] = [
        ("replace", {"email": "u@x", "age": "ten"}),
        ("patch", {"age": 200}),
        ("patch", {"email": None}),
        ("update", {"$set": {"age": 1.5}}),
        ("update", {"$unset": {"email": ""}}),
        ("update", {"$inc": {"age": 500}}),
        ("update", {"$set": {"tags": "x"}}),
        ("update", {"$rename": {"email": "mail"}}),
        ("update", {"$set": {"address": {"zip": 1}}}),
    ]
    for kind, change in attempts:
        with pytest.raises(SchemaViolation):
            if kind == "patch":
                await core.merge_patch("users", "u", change)
            else:
                await core.replace_or_update("users", "u", change)
    assert await stored(core, "u") == before  # nothing of it was written
    done = body(await core.replace_or_update("users", "u", {"$inc": {"age": 5}}))
    assert done["age"] == 15 and done["_version"] == 2
    done = body(await core.merge_patch("users", "u", {"address": {"city": "Oslo"}}))
    assert done["address"] == {"city": "Oslo"} and done["_version"] == 3
    done = body(await core.replace_or_update("users", "u", {"email": "v@x"}))
    assert done == {"_id": "u", "email": "v@x", "_version": 4}


async def test_immutable_fields_keep_their_value(core: Core) -> None:
    await core.create("users", {"_id": "i", "email": "i@x"})
    # absent before: setting it is allowed
    await core.replace_or_update("users", "i", {"$set": {"created": "2026-01-01T00:00:00Z"}})
    for change in (
        {"$set": {"created": "2026-02-01T00:00:00Z"}},
        {"$unset": {"created": ""}},
        {"email": "i@x"},  # a replace dropping it
    ):
        with pytest.raises(SchemaViolation) as err:
            await core.replace_or_update("users", "i", change)
        assert ("created", "immutable") in rules(err.value)
    with pytest.raises(SchemaViolation):
        await core.merge_patch("users", "i", {"created": "2027-01-01T00:00:00Z"})
    assert (await stored(core, "i") or {})["created"] == "2026-01-01T00:00:00Z"


async def test_upsert_creates_a_valid_document_with_defaults(core: Core) -> None:
    with pytest.raises(SchemaViolation):
        await core.replace_or_update("users", "up", {"$set": {"age": 3}}, upsert=True)
    assert await stored(core, "up") is None
    made = await core.replace_or_update("users", "up", {"$set": {"email": "up@x"}}, upsert=True)
    assert made.created and body(made)["role"] == "member"
    again = await core.replace_or_update("users", "up", {"$set": {"age": 4}}, upsert=True)
    assert not again.created and body(again)["age"] == 4 and body(again)["_version"] == 2
    put = await core.replace_or_update("users", "up2", {"email": "p@x"}, upsert=True)
    assert put.created and body(put)["role"] == "member"


async def test_if_match_holds_for_checked_changes(core: Core) -> None:
    await core.create("users", {"_id": "m", "email": "m@x", "age": 1})
    with pytest.raises(PreconditionFailed):
        await core.replace_or_update("users", "m", {"$inc": {"age": 1}}, if_match=7)
    done = await core.replace_or_update("users", "m", {"$inc": {"age": 1}}, if_match=1)
    assert done.version == 2
    with pytest.raises(NotFound):
        await core.replace_or_update("users", "missing", {"$inc": {"age": 1}})


async def test_concurrent_checked_updates_all_apply_once(core: Core) -> None:
    await core.create("users", {"_id": "hot", "email": "h@x", "age": 0})
    await asyncio.gather(
        *(core.replace_or_update("users", "hot", {"$inc": {"age": 1}}) for _ in range(8))
    )
    final = await stored(core, "hot")
    assert final is not None and final["age"] == 8 and final["_version"] == 9


# ---- levels and actions --------------------------------------------------------------------


async def test_moderate_level_lets_invalid_documents_be_updated(core: Core) -> None:
    await core.create("legacy", [{"_id": "bad", "n": "x"}, {"_id": "good", "n": 1}])
    await declare(
        core,
        "legacy",
        {"fields": [{"name": "n", "type": "integer"}], "validation": {"level": "moderate"}},
    )
    done = await core.replace_or_update("legacy", "bad", {"$set": {"other": 1}})
    assert body(done)["n"] == "x"  # still invalid, updated unchecked
    with pytest.raises(SchemaViolation):
        await core.replace_or_update("legacy", "good", {"$set": {"n": "y"}})
    with pytest.raises(SchemaViolation):
        await core.create("legacy", {"_id": "new", "n": "z"})


async def test_warn_action_writes_and_counts(core: Core) -> None:
    await declare(
        core,
        "loose",
        {"fields": [{"name": "n", "type": "integer"}], "validation": {"action": "warn"}},
    )
    await core.create("loose", {"_id": "w", "n": "text"})
    await core.replace_or_update("loose", "w", {"$set": {"n": "more"}})
    assert core.schemas.warnings["loose"] == 2
    assert body(await core.get("loose", "w"))["n"] == "more"


# ---- batches and transactions --------------------------------------------------------------


async def test_batch_with_an_invalid_operation_writes_nothing(core: Core) -> None:
    ops = [
        {"op": "create", "collection": "users", "document": {"_id": "b1", "email": "b1@x"}},
        {"op": "update", "collection": "users", "id": "b1", "update": {"$set": {"age": -5}}},
    ]
    with pytest.raises(SchemaViolation):
        await core.run_batch({"operations": ops})
    assert await stored(core, "b1") is None


async def test_interactive_transaction_checks_each_write(core: Core) -> None:
    backend: Backend = core.backend()
    tx = await backend.begin()
    try:
        await core.create("users", {"_id": "t1", "email": "t1@x"}, target=tx)
        with pytest.raises(SchemaViolation):
            await core.replace_or_update("users", "t1", {"$set": {"age": "old"}}, target=tx)
        done = await core.replace_or_update("users", "t1", {"$set": {"age": 5}}, target=tx)
        assert body(done)["age"] == 5
        await tx.commit()
    finally:
        if not tx.closed:
            await tx.rollback()
    assert (await stored(core, "t1") or {})["age"] == 5


async def test_collections_without_a_schema_stay_schemaless(core: Core) -> None:
    made = await core.create("free", {"anything": [1, "two", {"3": None}]})
    assert isinstance(made, WriteResult)
    assert core.active_schema is not None
    assert await core.schemas.of(core.backend(), "free") is None


async def test_describe_schema_shows_declared_and_inferred(core: Core) -> None:
    await core.create("users", {"_id": "d1", "email": "d@x", "age": 4})
    out = await core.describe_schema("users")
    assert out["declared"] and out["schema"]["fields"][0]["name"] == "email"
    assert out["estimated_count"] >= 1 and out["exists"]
    await core.create("free", [{"a": 1, "b": {"c": "x"}}, {"a": "s"}])
    free = await core.describe_schema("free")
    assert not free["declared"] and free["schema"] is None
    names = {f["name"]: f for f in free["inferred"]["fields"]}
    assert set(names["a"]["type"]) == {"integer", "string"} and names["b.c"]["inferred"]


# ---- unique indexes built by a migration -----------------------------------------------------


async def test_a_taken_unique_key_refuses_only_its_own_document(core: Core) -> None:
    runner = MigrationRunner(
        {"main": core.backend().migrations()},
        "main",
        schemas_changed=lambda _: core.refresh_schemas(),
    )
    index = {"name": "by_email", "fields": ["email"], "unique": True}
    out = await runner.submit(
        parse_migration(
            {
                "id": "u1",
                "version": 1,
                "script": {
                    "operations": [{"op": "create_index", "collection": "users", "index": index}]
                },
            }
        ),
        wait=30.0,
    )
    assert out.status == 201, out.body
    await core.create("users", {"_id": "x1", "email": "same@x"})
    results = await core.create(
        "users",
        [
            {"_id": "x2", "email": "other@x"},
            {"_id": "x3", "email": "same@x"},
            {"_id": "x4", "email": "4@x"},
        ],
    )
    assert isinstance(results, list)
    assert [r.status for r in results] == [201, 409, 201]
    assert results[1].error is not None and results[1].error["code"] == "duplicate_key"
    assert results[1].error["details"]["index"] == "by_email"
    # concurrent single creates (coalesced into one statement on PostgreSQL): only the
    # one holding the taken key is refused
    outcomes = await asyncio.gather(
        *(core.create("users", {"_id": f"c{i}", "email": f"c{i}@x"}) for i in range(5)),
        core.create("users", {"_id": "c-dup", "email": "same@x"}),
        return_exceptions=True,
    )
    assert all(isinstance(o, WriteResult) for o in outcomes[:5]), outcomes
    assert isinstance(outcomes[5], DuplicateKey) and outcomes[5].details["index"] == "by_email"
    described = await core.describe_schema("users")
    by_email = [ix for ix in described["indexes"] if ix["name"] == "by_email"]
    assert by_email and by_email[0]["declared"] and by_email[0]["unique"]
    assert by_email[0]["valid"] and by_email[0]["fields"] == ["email"]


@pytest.mark.parametrize("kind", kinds_with("schemas"))
async def test_another_sidecars_migration_is_enforced_soon(
    kind: str, pg_dsn: str, tmp_path: Any
) -> None:
    """Two sidecars on one database: a migration run by one is enforced by the other as
    soon as its backend reports it (NOTIFY on PostgreSQL, the file poll on SQLite)."""
    async with backend_namespace(kind, pg_dsn, Limits(), str(tmp_path)) as make:
        first, second = make(), make()
        await first.start()
        await second.start()
        try:
            here, there = core_over(first, Limits()), core_over(second, Limits())
            await there.create("late", {"n": "anything"})  # loaded now: schemaless
            watcher = asyncio.create_task(there.watch_schemas(second))
            await asyncio.sleep(0.3)  # listening
            runner = MigrationRunner({"main": first.migrations()}, "main")
            schema = {"fields": [{"name": "n", "type": "integer", "required": True}]}
            raw = {
                "id": "late-schema",
                "version": 1,
                "script": {
                    "operations": [
                        {
                            "op": "set_schema",
                            "collection": "late",
                            "schema": {**schema, "validation": {"level": "moderate"}},
                        }
                    ]
                },
            }
            out = await runner.submit(parse_migration(raw), wait=30.0)
            assert out.status == 201, out.body
            deadline = asyncio.get_running_loop().time() + 10.0
            while True:
                try:
                    await there.create("late", {"n": "text"})
                except SchemaViolation:
                    break
                assert asyncio.get_running_loop().time() < deadline, "never enforced"
                await asyncio.sleep(0.05)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await runner.close()
            assert here is not there
        finally:
            await first.close()
            await second.close()


async def test_finds_and_counts_carry_the_declared_kinds(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline hands the compiler the declared scalar paths of an enforced schema."""
    await declare(
        core,
        "typed",
        {"fields": [{"name": "grp", "type": "integer"}, {"name": "name", "type": "string"}]},
    )
    await core.create("typed", [{"grp": 1, "name": "a"}, {"grp": 2, "name": "b"}])
    backend: Any = core.backend()
    seen: list[Any] = []
    find, count = backend.find, backend.count

    async def spy_find(collection: str, spec: Any) -> Any:
        seen.append(spec.kinds)
        return await find(collection, spec)

    async def spy_count(collection: str, flt: Any, *, kinds: Any = ()) -> int:
        seen.append(kinds)
        return int(await count(collection, flt, kinds=kinds))

    monkeypatch.setattr(backend, "find", spy_find)
    monkeypatch.setattr(backend, "count", spy_count)
    spec = core.find_spec({"filter": {"grp": {"$gte": 2}}, "sort": "name"}, from_url=False)
    page = await core.find("typed", spec)
    assert [orjson.loads(b)["name"] for b in page.items] == ["b"]
    assert await core.count("typed", {"grp": 1}) == 1
    expected = ((("grp",), "number"), (("name",), "string"))
    assert seen == [expected, expected]
