"""Backend factories for the conformance suite: one entry per backend kind."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.backends.base import Backend
from proxy.backends.postgres import PostgresBackend
from proxy.config import Config, DatabaseConfig, Limits, PoolSettings
from proxy.core import Core

KINDS = ["postgresql"]


@asynccontextmanager
async def open_backend(
    kind: str, pg_dsn: str, limits: Limits, tmp_dir: str
) -> AsyncIterator[Backend]:
    """A started backend in a namespace of its own, removed afterwards."""
    if kind == "postgresql":
        schema = f"t_{uuid.uuid4().hex[:12]}"
        cfg = DatabaseConfig(
            name="main",
            type="postgresql",
            connection_string=pg_dsn,
            pool_settings=PoolSettings(min_connections=1, max_connections=8, timeout_seconds=5),
        )
        backend = PostgresBackend(cfg, limits, schema=schema)
        await backend.start()
        try:
            yield backend
        finally:
            assert backend.pool is not None
            async with backend.pool.acquire() as conn:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await backend.close()
        return
    raise ValueError(kind)


@asynccontextmanager
async def open_core(kind: str, pg_dsn: str, limits: Limits, tmp_dir: str) -> AsyncIterator[Core]:
    async with open_backend(kind, pg_dsn, limits, tmp_dir) as backend:
        config = Config(limits=limits, databases=(), default_database="main")
        yield Core(config, {"main": backend}, "main")


def mongo_url() -> str | None:
    return os.environ.get("MONGODB_URL")
