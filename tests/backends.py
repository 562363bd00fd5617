"""Backend factories for the conformance suite: one entry per backend kind."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from proxy.backends.base import Backend
from proxy.backends.mongo import MongoBackend
from proxy.backends.postgres import PostgresBackend
from proxy.backends.sqlite import SqliteBackend
from proxy.config import Config, DatabaseConfig, Limits, PoolSettings
from proxy.pipeline.core import Core

KINDS = ["postgresql", "sqlite", "mongodb"]
_CLASSES: dict[str, type] = {
    "postgresql": PostgresBackend,
    "sqlite": SqliteBackend,
    "mongodb": MongoBackend,
}


def kinds_with(*capabilities: str) -> list[Any]:
    """KINDS for a suite that needs ``capabilities``: a backend that does not declare one
    (``Capabilities``) is listed as skipped, with the reason."""
    out: list[Any] = []
    for kind in KINDS:
        declared = _CLASSES[kind].capabilities  # type: ignore[attr-defined]
        missing = [c for c in capabilities if not getattr(declared, c)]
        if missing:
            reason = f"{kind} does not declare Capabilities.{', '.join(missing)}"
            out.append(pytest.param(kind, marks=pytest.mark.skip(reason=reason)))
        else:
            out.append(kind)
    return out


_POOL = PoolSettings(min_connections=1, max_connections=8, timeout_seconds=5)


@asynccontextmanager
async def backend_namespace(
    kind: str, pg_dsn: str, limits: Limits, tmp_dir: str
) -> AsyncIterator[Callable[[], Backend]]:
    """A namespace of its own (a PostgreSQL schema, an SQLite file) that outlives the
    backends opened on it: yields a factory of unstarted backends; removed afterwards."""
    if kind == "postgresql":
        schema = f"t_{uuid.uuid4().hex[:12]}"
        cfg = DatabaseConfig(
            name="main", type="postgresql", connection_string=pg_dsn, pool_settings=_POOL
        )
        try:
            yield lambda: PostgresBackend(cfg, limits, schema=schema)
        finally:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
        return
    if kind == "sqlite":
        path = os.path.join(tmp_dir, f"t_{uuid.uuid4().hex[:12]}.sqlite3")
        cfg = DatabaseConfig(
            name="main", type="sqlite", connection_string=f"sqlite://{path}", pool_settings=_POOL
        )
        try:
            yield lambda: SqliteBackend(cfg, limits, path=path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        return
    if kind == "mongodb":
        from pymongo import AsyncMongoClient

        from tests.mongo_server import mongo_url

        url = mongo_url()
        database = f"t_{uuid.uuid4().hex[:12]}"
        cfg = DatabaseConfig(
            name="main", type="mongodb", connection_string=url, pool_settings=_POOL
        )
        try:
            yield lambda: MongoBackend(cfg, limits, database=database)
        finally:
            client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(url)
            try:
                await client.drop_database(database)
            finally:
                await client.close()
        return
    raise ValueError(kind)


@asynccontextmanager
async def open_backend(
    kind: str, pg_dsn: str, limits: Limits, tmp_dir: str
) -> AsyncIterator[Backend]:
    """A started backend in a namespace of its own, removed afterwards."""
    async with backend_namespace(kind, pg_dsn, limits, tmp_dir) as make:
        backend = make()
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()


def core_over(backend: Backend, limits: Limits) -> Core:
    config = Config(limits=limits, databases=(), default_database="main")
    return Core(config, {"main": backend}, "main")


@asynccontextmanager
async def open_core(kind: str, pg_dsn: str, limits: Limits, tmp_dir: str) -> AsyncIterator[Core]:
    async with open_backend(kind, pg_dsn, limits, tmp_dir) as backend:
        yield core_over(backend, limits)


# The conformance suite's partitioned variants (issue 21): PostgreSQL, with the collections
# the cases use declared partitioned by a migration before the first write
PARTITIONED = {
    "postgresql": None,
    "postgresql-hash": {"strategy": "hash", "key": "tenant_id", "partitions": 4},
    "postgresql-list": {
        "strategy": "list",
        "key": "tenant_id",
        "values": {"a": ["t1"], "b": ["t2", "t3"]},
        "default": True,
    },
    "postgresql-range": {"strategy": "range", "key": "tenant_id", "bounds": ["t2", "t3"]},
}


@asynccontextmanager
async def open_partitioned_core(
    variant: str, collections: tuple[str, ...], pg_dsn: str, limits: Limits, tmp_dir: str
) -> AsyncIterator[Core]:
    """A Core over PostgreSQL whose ``collections`` are partitioned as ``variant`` says
    (``postgresql``: plain tables, the reference the variants must agree with)."""
    from proxy.migrate.ops import parse_migration
    from proxy.migrate.runner import MigrationRunner

    async with open_backend("postgresql", pg_dsn, limits, tmp_dir) as backend:
        part = PARTITIONED[variant]
        if part is not None:
            ops = [
                {"op": "create_collection", "collection": c, "schema": {"partitioning": part}}
                for c in collections
            ]
            runner = MigrationRunner({"main": backend.migrations()}, "main")
            raw = {"id": "partitioned", "version": 1, "script": {"operations": ops}}
            out = await runner.submit(parse_migration(raw), wait=30.0)
            assert out.status == 201, out.body
        core = core_over(backend, limits)
        await core.refresh_schemas()
        yield core
