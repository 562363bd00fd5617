"""The index a migration's create_index builds is the one the typed finds use: declared
through the migration runner (create_collection with an enforced schema, create_index),
then the backend's own find SQL for ``{"grp": g, "n": {"$gte": k}}`` sorted and limited is
EXPLAINed, ascending and descending, on a number and a string path, on both backends."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from proxy.backends.base import Backend
from proxy.backends.migrations import physical_index_name
from proxy.backends.postgres import PostgresBackend
from proxy.backends.sqlite import SqliteBackend
from proxy.backends.sqlite.connection import ConnState, connect
from proxy.config import Limits
from proxy.migrate.ops import parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.query.spec import build_find_spec
from proxy.schema.model import parse_schema
from tests.backends import kinds_with, open_backend

# MongoDB declares schemas but has no SQL plan to read (see test_mongo_schemas.py)
SQL_KINDS = [
    k
    if k != "mongodb"
    else pytest.param(
        k,
        marks=pytest.mark.skip(
            reason="SQL EXPLAIN plans; MongoDB index use: test_mongo_schemas.py"
        ),
    )
    for k in kinds_with("schemas")
]

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

LIMITS = Limits()
C = "declared_mig"
N_DOCS = 20_000
SCHEMA = {
    "fields": [
        {"name": "grp", "type": "integer", "required": True},
        {"name": "n", "type": "integer", "required": True},
        {"name": "s", "type": "string"},
    ],
    "validation": {"level": "strict", "action": "error"},
}
KINDS_OF = tuple(sorted(parse_schema(SCHEMA, C).scalar_kinds().items()))
_ids = itertools.count()


def _doc(i: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": f"d{i:06d}", "grp": i % 100, "n": (i * 7919) % N_DOCS}
    if i % 7:
        doc["s"] = f"s{(i * 7919) % N_DOCS:06d}"
    return doc


async def _migrate(runner: MigrationRunner, *ops: dict[str, Any]) -> None:
    raw = {"id": f"ix{next(_ids)}", "version": 1, "script": {"operations": list(ops)}}
    out = await runner.submit(parse_migration(raw), wait=60.0)
    assert out.status == 201 and out.body["status"] == "completed", out.body


async def _analyze(backend: Backend) -> None:
    if isinstance(backend, PostgresBackend):
        async with backend._conn() as conn:
            await conn.execute(f"ANALYZE {backend._table(C)}")
    else:
        assert isinstance(backend, SqliteBackend)
        await backend._write(None, lambda conn: conn.execute("ANALYZE"))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=SQL_KINDS)
async def declared(
    request: pytest.FixtureRequest, pg_dsn: str, tmp_path_factory: Any
) -> AsyncIterator[tuple[Backend, MigrationRunner]]:
    tmp = tmp_path_factory.mktemp("migration_ix")
    async with open_backend(request.param, pg_dsn, LIMITS, str(tmp)) as backend:
        runner = MigrationRunner({"main": backend.migrations()}, "main")
        await _migrate(runner, {"op": "create_collection", "collection": C, "schema": SCHEMA})
        for start in range(0, N_DOCS, 2000):
            out = await backend.insert_many(C, [_doc(i) for i in range(start, start + 2000)])
            assert all(r.status == 201 for r in out)
        yield backend, runner


def _spec(raw: dict[str, Any]) -> Any:
    return dataclasses.replace(build_find_spec(raw, LIMITS, from_url=False), kinds=KINDS_OF)


def _pg_indexes_scanned(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    out, stack = [], [plan]
    while stack:
        node = stack.pop()
        out.append((node["Node Type"], node.get("Index Name")))
        stack.extend(node.get("Plans", []))
    return out


async def _plan(backend: Backend, raw: dict[str, Any]) -> str:
    spec = _spec(raw)
    if isinstance(backend, PostgresBackend):
        statement = backend.find_statement(C, spec)
        assert statement.declared  # every condition typed: the coalescable shape
        async with backend._conn() as conn:
            got = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement.sql}", *statement.args)
        plan = (orjson.loads(got) if isinstance(got, str) else got)[0]["Plan"]
        return repr(_pg_indexes_scanned(plan))
    assert isinstance(backend, SqliteBackend)
    sql, args, _ = backend.find_statement(C, spec)
    # a connection of its own: an EXPLAIN prepared on a connection whose schema predates the
    # migration (and kept in its statement cache) is planned without the new index, while a
    # real statement notices the schema change and is prepared again
    conn = connect(backend.path, ConnState(5.0), writes=False, busy_ms=1000)
    try:
        return "\n".join(str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    finally:
        conn.close()


def _sorted_on_index(plan: str, backend: Backend, index: str) -> bool:
    """The plan reads the index in the find's key order: no full sort (PostgreSQL's
    incremental sort only orders the ties by ``_id``, the keyset's last key)."""
    physical = physical_index_name(C, index)
    if isinstance(backend, PostgresBackend):
        scans = ("Index Scan", "Index Only Scan")
        used = any(f"('{s}', '{physical}')" in plan for s in scans)
        return used and "'Sort'" not in plan
    used = f"USING INDEX {physical}" in plan or f"USING COVERING INDEX {physical}" in plan
    return used and "USE TEMP B-TREE FOR ORDER BY" not in plan


NUMBER = {"filter": {"grp": 7, "n": {"$gte": 5000}}, "limit": 10}
STRING = {"filter": {"grp": 7, "s": {"$gte": "s005000"}}, "limit": 10}
# (index fields as the migration declares them, the find, the sorts it must serve in order)
CASES = [
    (["grp", "n"], NUMBER, ("n", "-n")),
    (["grp", "-n"], NUMBER, ("n", "-n")),
    (["grp", "s"], STRING, ("s", "-s")),
    (["grp", "-s"], STRING, ("s", "-s")),
]


@pytest.mark.parametrize(
    ("fields", "find", "sorts"), CASES, ids=["_".join(c[0]).replace("-", "desc_") for c in CASES]
)
async def test_migration_index_serves_the_typed_find(
    declared: tuple[Backend, MigrationRunner],
    fields: list[str],
    find: dict[str, Any],
    sorts: tuple[str, ...],
) -> None:
    backend, runner = declared
    name = "ix_" + "_".join(f.replace("-", "d") for f in fields)
    index = {"name": name, "fields": fields}
    await _migrate(runner, {"op": "create_index", "collection": C, "index": index})
    try:
        await _analyze(backend)
        for sort in sorts:
            plan = await _plan(backend, {**find, "sort": sort})
            assert _sorted_on_index(plan, backend, name), (fields, sort, plan)
    finally:
        await _migrate(runner, {"op": "drop_index", "collection": C, "name": name})


async def test_answers_over_the_migration_index(declared: tuple[Backend, MigrationRunner]) -> None:
    backend, runner = declared
    index = {"name": "ix_answers", "fields": ["grp", "n"]}
    await _migrate(runner, {"op": "create_index", "collection": C, "index": index})
    try:
        docs = [_doc(i) for i in range(N_DOCS)]
        for sort, rev in (("n", False), ("-n", True)):
            page = await backend.find(C, _spec({**NUMBER, "sort": sort}))
            got = [orjson.loads(b)["n"] for b in page.items]
            want = sorted((d["n"] for d in docs if d["grp"] == 7 and d["n"] >= 5000), reverse=rev)
            assert got == want[:10]
    finally:
        await _migrate(runner, {"op": "drop_index", "collection": C, "name": "ix_answers"})
