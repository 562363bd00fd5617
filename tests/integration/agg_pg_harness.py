"""A PostgreSQL schema of its own for aggregation tests: load collections, run a compiled
pipeline with asyncpg, decode its documents (tests/integration/test_aggregate_pg*.py)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from proxy.backends.postgres.ddl import create_schema, create_table
from proxy.backends.postgres.errors import translate
from proxy.query.aggregate.ast import (
    Accumulator,
    Call,
    Facet,
    Field,
    Lit,
    Lookup,
    Pipeline,
    Stage,
    View,
)
from proxy.query.aggregate.pg import compile_pipeline, compile_speculative


class AggDb:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.schema = f'"agg_{uuid.uuid4().hex[:10]}"'
        self.loaded: set[str] = set()

    async def setup(self) -> None:
        async with self.conn.transaction():
            await create_schema(self.conn, self.schema)

    async def drop(self) -> None:
        await self.conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def table(self, name: str) -> str:
        return f'{self.schema}."{name}"'

    async def load(self, name: str, docs: Sequence[Mapping[str, Any]]) -> None:
        table = self.table(name)
        if name not in self.loaded:
            await create_table(self.conn, table, name, 10.0, self.schema)
            self.loaded.add(name)
        await self.conn.execute(f"TRUNCATE {table}")
        rows = []
        for d in docs:
            full = {"_version": 1, **d}
            rows.append((str(full["_id"]), orjson.dumps(full).decode()))
        await self.conn.executemany(f"INSERT INTO {table} (_id, doc) VALUES ($1, $2::jsonb)", rows)

    def compile(
        self,
        stages: Sequence[Stage] | Pipeline,
        collection: str,
        views: Mapping[str, View] | None = None,
        cap: int = 1000,
        speculative: bool = False,
    ) -> tuple[str, list[Any]]:
        """The statement (``speculative``: compile_speculative's, which must exist)."""
        if isinstance(stages, Pipeline):
            pipeline = stages
        else:
            pipeline = Pipeline(tuple(stages), tuple(sorted(_lookups(stages))))
        views = dict(views or {})
        base = views.get(collection, View(collection))
        names = {collection, *pipeline.lookups}
        for n in names:
            views.setdefault(n, View(n))
        tables = {n: (self.table(n) if n in self.loaded else None) for n in names}
        if speculative:
            out = compile_speculative(
                pipeline, base, views, schema=self.schema, tables=tables, cap=cap
            )
            assert out is not None, "no speculative statement for this pipeline"
            return out
        return compile_pipeline(pipeline, base, views, schema=self.schema, tables=tables, cap=cap)

    async def run(
        self,
        stages: Sequence[Stage] | Pipeline,
        collection: str,
        views: Mapping[str, View] | None = None,
        cap: int = 1000,
        strip: bool = True,
        speculative: bool = False,
    ) -> list[Any]:
        sql, args = self.compile(stages, collection, views, cap, speculative)
        try:
            rows = await self.conn.fetch(sql, *args)
        except asyncpg.PostgresError as exc:
            raise translate(exc) from exc
        out = [orjson.loads(r["doc"]) for r in rows]
        if strip:
            for d in out:
                if isinstance(d, dict):
                    d.pop("_version", None)
        return out


def _lookups(stages: Sequence[Stage]) -> set[str]:
    out: set[str] = set()
    for s in stages:
        if isinstance(s, Lookup):
            out.add(s.collection)
        elif isinstance(s, Facet):
            for _, sub in s.facets:
                out |= _lookups(sub)
    return out


# shorthands of the hand-built pipelines, and the documents both stage test modules use


def F(path: str) -> Field:
    return Field(tuple(path.split(".")) if path else ())


def C(op: str, *args: Any) -> Call:
    return Call(
        op, tuple(a if not isinstance(a, int | float | str | None) else Lit(a) for a in args)
    )


def acc(op: str, arg: Any) -> Accumulator:
    return Accumulator(op, arg if not isinstance(arg, int | str) else Lit(arg))


SALES = [
    {"_id": "a1", "cat": "x", "n": 1, "tags": ["p", "q"]},
    {"_id": "a2", "cat": "y", "n": 2.5, "tags": []},
    {"_id": "a3", "cat": "x", "n": "str", "tags": ["q"]},
    {"_id": "a4", "n": 4},
    {"_id": "a5", "cat": None, "n": None, "tags": "solo"},
    {"_id": "a6", "cat": "y", "n": 10},
]
