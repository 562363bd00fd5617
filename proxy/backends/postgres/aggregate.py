"""Aggregation on PostgreSQL: a pipeline compiled to one statement, run where the router
sends analytics, its rows returned as JSON text."""

from __future__ import annotations

from typing import Any

import orjson

from proxy import context
from proxy.errors import InvalidQuery
from proxy.query.aggregate.ast import Aggregated, AggregateSpec
from proxy.query.aggregate.pg import compile_pipeline


class PgAggregate:
    """``aggregate``, mixed into the document operations (the pooled backend and a pinned
    transaction): ``_table`` names tables, ``_analytics`` runs one read (None: the
    statement's first table does not exist)."""

    _schema_ident: str
    _known_tables: set[str]

    def _table(self, collection: str) -> str:
        raise NotImplementedError

    async def _analytics(self, collection: str, sql: str, *args: Any) -> list[Any] | None:
        raise NotImplementedError

    async def _present(self, collection: str, lookups: tuple[str, ...]) -> set[str]:
        """The looked-up collections that have a table. Known ones cost nothing; the others
        are asked once (a catalog read) and remembered when found."""
        unknown = [n for n in lookups if n not in self._known_tables]
        if unknown:
            tables = [self._table(n) for n in unknown]
            rows = await self._analytics(
                collection,
                "SELECT n FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL",
                tables,
            )
            found = {r[0] for r in rows or ()}
            self._known_tables.update(n for n, t in zip(unknown, tables, strict=True) if t in found)
        return {n for n in lookups if n in self._known_tables}

    async def aggregate(self, collection: str, spec: AggregateSpec) -> Aggregated:
        lookups = spec.pipeline.lookups
        present = await self._present(collection, lookups) if lookups else set()
        tables: dict[str, str | None] = {collection: self._table(collection)}
        tables.update({n: self._table(n) if n in present else None for n in lookups})
        sql, args = self._compile(spec, tables)
        if spec.explain:
            rows = await self._analytics(collection, f"EXPLAIN (FORMAT JSON) {sql}", *args)
            raw = rows[0][0] if rows else None
            plan = orjson.loads(raw) if isinstance(raw, str) else raw
            return Aggregated([], {"sql": sql, "plan": plan})
        context.last_statement.set((sql, tuple(args)))
        try:
            rows = await self._analytics(collection, sql, *args)
            if rows is None:  # no table yet: an empty collection ($facet still answers once)
                tables[collection] = None
                sql, args = self._compile(spec, tables)
                rows = await self._analytics(collection, sql, *args)
        except InvalidQuery as err:
            if err.code != "update_type_mismatch":
                raise
            # the one cast a pipeline makes without a type test: a declared number path
            # (View.numbers) holding something else, written around dbproxy
            raise InvalidQuery(
                "a stored document does not have the types its collection's schema "
                "declares (a declared number holds another value)",
                code="expression_failed",
            ) from None
        return Aggregated([r[0].encode() for r in rows or ()])

    def _compile(self, spec: AggregateSpec, tables: dict[str, str | None]) -> tuple[str, list[Any]]:
        views = {v.collection: v for v in spec.views}
        return compile_pipeline(
            spec.pipeline,
            spec.base,
            views,
            schema=self._schema_ident,
            tables=tables,
            cap=spec.cap,
            max_bytes=spec.max_bytes,
        )
