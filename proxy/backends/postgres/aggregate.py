"""Aggregation on PostgreSQL: a pipeline compiled to one statement, run where the router
sends analytics, its rows returned as JSON text."""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy import context
from proxy.errors import InvalidQuery
from proxy.query.aggregate.ast import Aggregated, AggregateSpec
from proxy.query.aggregate.pg import compile_pipeline, compile_speculative


class Speculation:
    """The speculative statements (``compile_speculative``) that failed: a value of an
    accumulated field was not a number. Each is not tried again for ``hold`` seconds (the
    pipeline runs as written at once), so a collection of mixed values pays the failed
    statement once in a while, not on every request. At most ``size`` are remembered."""

    def __init__(self, hold: float = 600.0, size: int = 1024) -> None:
        self.hold = hold
        self.size = size
        self._failed: dict[str, float] = {}  # statement text -> until when

    def worth(self, sql: str) -> bool:
        until = self._failed.get(sql)
        if until is None:
            return True
        if until > time.monotonic():
            return False
        del self._failed[sql]
        return True

    def failed(self, sql: str) -> None:
        if len(self._failed) >= self.size:
            del self._failed[next(iter(self._failed))]  # the oldest
        self._failed[sql] = time.monotonic() + self.hold


class PgAggregate:
    """``aggregate``, mixed into the document operations (the pooled backend and a pinned
    transaction): ``_table`` names tables, ``_analytics`` runs one read (None: the
    statement's first table does not exist)."""

    _schema_ident: str
    _known_tables: set[str]
    # where a failed statement costs nothing more (not in a transaction, which it would
    # abort): pipelines are first run speculatively (compile_speculative)
    _speculation: Speculation | None = None

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
        speculative = self._speculative(spec, tables)
        sql, args = speculative or self._compile(spec, tables)
        if spec.explain:
            rows = await self._analytics(collection, f"EXPLAIN (FORMAT JSON) {sql}", *args)
            raw = rows[0][0] if rows else None
            plan = orjson.loads(raw) if isinstance(raw, str) else raw
            return Aggregated([], {"sql": sql, "plan": plan})
        context.last_statement.set((sql, tuple(args)))
        try:
            try:
                rows = await self._analytics(collection, sql, *args)
            except InvalidQuery as err:
                if speculative is None or err.code != "update_type_mismatch":
                    raise
                assert self._speculation is not None
                self._speculation.failed(sql)  # a value was not a number: as written
                sql, args = self._compile(spec, tables)
                context.last_statement.set((sql, tuple(args)))
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

    def _speculative(
        self, spec: AggregateSpec, tables: dict[str, str | None]
    ) -> tuple[str, list[Any]] | None:
        """The speculative statement, when there is one and it has not failed lately."""
        if self._speculation is None:
            return None
        views = {v.collection: v for v in spec.views}
        out = compile_speculative(
            spec.pipeline,
            spec.base,
            views,
            schema=self._schema_ident,
            tables=tables,
            cap=spec.cap,
            max_bytes=spec.max_bytes,
        )
        return out if out is not None and self._speculation.worth(out[0]) else None

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
