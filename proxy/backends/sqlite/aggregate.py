"""Aggregation on the embedded store: a pipeline compiled to one SQLite statement, run on a
reader (or the transaction's connection), its rows returned as JSON text."""

from __future__ import annotations

import sqlite3
from typing import Any

from proxy import context
from proxy.backends.sqlite.connection import Job, T
from proxy.backends.sqlite.ddl import table_name
from proxy.backends.sqlite.errors import no_table
from proxy.query.aggregate.ast import Aggregated, AggregateSpec
from proxy.query.aggregate.sqlite import compile_pipeline

_TABLES_SQL = "SELECT name FROM sqlite_master WHERE type = 'table'"


class SqliteAggregate:
    """``aggregate``, mixed into the document operations of the backend and of a
    transaction (``_read`` runs a job on a connection)."""

    async def _read(self, fn: Job[T]) -> T:
        raise NotImplementedError

    async def aggregate(self, collection: str, spec: AggregateSpec) -> Aggregated:
        names = (collection, *spec.pipeline.lookups)
        views = {v.collection: v for v in spec.views}

        def compiled(present: set[str] | None) -> tuple[str, list[Any]]:
            tables = {
                n: table_name(n) if present is None or table_name(n)[1:-1] in present else None
                for n in names
            }
            return compile_pipeline(
                spec.pipeline,
                spec.base,
                views,
                tables=tables,
                cap=spec.cap,
                max_bytes=spec.max_bytes,
            )

        sql, args = compiled(None)
        context.last_statement.set((sql, tuple(args)))

        def run(conn: sqlite3.Connection) -> tuple[str, list[Any]]:
            nonlocal sql, args
            try:
                return sql, _execute(conn, sql, args, spec.explain)
            except sqlite3.OperationalError as exc:
                if not no_table(exc):
                    raise
            present = {r[0] for r in conn.execute(_TABLES_SQL)}  # a table is missing: which
            sql, args = compiled(present)
            return sql, _execute(conn, sql, args, spec.explain)

        ran, rows = await self._read(run)
        if spec.explain:
            return Aggregated([], {"sql": ran, "plan": [str(r[-1]) for r in rows]})
        return Aggregated([r[0] if isinstance(r[0], bytes) else r[0].encode() for r in rows])


def _execute(conn: sqlite3.Connection, sql: str, args: list[Any], explain: bool) -> list[Any]:
    if explain:
        return conn.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
    return conn.execute(sql, args).fetchall()
