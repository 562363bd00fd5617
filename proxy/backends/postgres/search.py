"""Full-text search on PostgreSQL: every target in one statement (stored ``tsvector``
columns with GIN indexes where declared, computed vectors elsewhere), run where the
router sends analytics."""

from __future__ import annotations

import dataclasses
from typing import Any

from proxy import context
from proxy.query.search import SearchHit, SearchHits, SearchRequest
from proxy.query.search_pg import SearchLayout as L
from proxy.query.search_pg import compile_search, headline_fields

COLLECTION_NAMES = (
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname ~ '^[A-Za-z][A-Za-z0-9_]*$' "
    "AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'doc' "
    'AND NOT a.attisdropped) ORDER BY c.relname COLLATE "C"'
)


class PgSearch:
    """``search`` and ``collection_names``, mixed into the document operations next to
    PgAggregate (whose ``_present`` finds which targets have a table)."""

    schema: str
    _schema_ident: str
    _known_tables: set[str]

    def _table(self, collection: str) -> str:
        raise NotImplementedError

    async def _analytics(self, collection: str, sql: str, *args: Any) -> list[Any] | None:
        raise NotImplementedError

    async def _present(self, collection: str, lookups: tuple[str, ...]) -> set[str]:
        raise NotImplementedError

    async def collection_names(self) -> list[str]:
        rows = await self._analytics("", COLLECTION_NAMES, self.schema)
        return [r[0] for r in rows or ()]

    async def search(self, request: SearchRequest, retry: bool = True) -> SearchHits:
        names = tuple(t.collection for t in request.targets)
        if not names or request.query.empty:
            return SearchHits([], 0 if request.total else None)
        present = await self._present(names[0], names)
        tables = {n: self._table(n) for n in names if n in present}
        compiled = compile_search(request, self._schema_ident, tables)
        if compiled is None:
            return SearchHits([], 0 if request.total else None)
        sql, args = compiled
        context.last_statement.set((sql, tuple(args)))
        rows = await self._analytics(names[0], sql, *args)
        if rows is None:  # a table went away since it was seen: search what is left
            if not retry:
                return SearchHits([], 0 if request.total else None)
            self._known_tables.difference_update(names)
            return await self.search(request, retry=False)
        hits = [
            SearchHit(
                r[L.COLLECTION],
                r[L.ID],
                float(r[L.SCORE]),
                r[L.DOC].encode(),
                headline_fields(r[L.HEADLINE]),
            )
            for r in rows
        ]
        total = None
        if request.total:
            total = int(rows[0][L.TOTAL]) if rows else await self._count_only(request, tables)
        return SearchHits(hits, total)

    async def _count_only(self, request: SearchRequest, tables: dict[str, str]) -> int:
        """The total when the page is empty (the statement's rows carried it otherwise)."""
        if request.after is None:
            return 0
        first = dataclasses.replace(request, after=None, limit=0, highlight=False)
        compiled = compile_search(first, self._schema_ident, tables)
        if compiled is None:
            return 0
        sql, args = compiled
        rows = await self._analytics(request.targets[0].collection, sql, *args)
        return int(rows[0][L.TOTAL]) if rows else 0
