"""Coalesced documents: concurrent point reads of one collection share one query, and
concurrent creates share one INSERT (and one commit), each keeping its own outcome."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from proxy import context
from proxy.backends.coalesce import Batcher, Coalescer, FetchMany
from proxy.backends.postgres.coalesce_find import FindCoalescer, batched_sql
from proxy.backends.postgres.documents import FindStatement, PgDocuments
from proxy.backends.postgres.partitions import PartKey
from proxy.backends.postgres.sql import insert_batch
from proxy.config import Limits
from proxy.context import RequestContext
from proxy.errors import BadRequest, DuplicateId, DuplicateKey, InvalidQuery, ProxyError
from proxy.ids import IdGenerator
from proxy.query.spec import FindSpec, Page, WriteResult

_Insert = tuple[str, str, str, str]  # _id, document JSON, service, request id
_Outcome = tuple[bool, str | None]  # inserted, the write's consistency token


class CoalescingDocuments(PgDocuments):
    """The shared document operations, with ``get`` and ``insert_one`` coalesced (unless
    ``coalesce`` is off)."""

    def __init__(
        self,
        name: str,
        limits: Limits,
        schema: str,
        ids: IdGenerator,
        known_tables: set[str],
        audit: bool = True,
        coalesce: bool = True,
    ) -> None:
        super().__init__(name, limits, schema, ids, known_tables, audit)
        self.coalesce = coalesce
        self._coalescers: dict[tuple[str, str | None], Coalescer[str, WriteResult]] = {}
        # by collection and layout (a partitioned collection's statement fills _pkey)
        self._inserters: dict[tuple[str, PartKey | None], Batcher[_Insert, _Outcome]] = {}
        # by (collection, read preference, statement timeout, SQL text): a batch's callers
        # share its endpoint and its deadline's length; None: the shape is not batched
        self._finders: dict[tuple[str, str | None, float | None, str], FindCoalescer | None] = {}

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        """Create one document. Concurrent creates of one collection are written by ONE
        statement (and one commit); each is answered only after that commit returned, with
        its own outcome, and each keeps its own audit row."""
        if not self.coalesce:
            return await super().insert_one(collection, doc)
        doc_id, body = self._prepare(doc)
        ctx = context.current.get()
        if collection not in self._known_tables:  # the table's layout decides the statement
            await self._learn(collection)
        layout = (collection, self._key(collection))
        batcher = self._inserters.get(layout)
        if batcher is None:
            if len(self._inserters) > 10_000:
                self._inserters.clear()
            batcher = self._inserters[layout] = Batcher(
                self._insert_batch_runner(collection), key=lambda item: item[0]
            )
        inserted, token = await batcher.submit((doc_id, body.decode(), ctx.service, ctx.request_id))
        if token is not None:
            context.write_token.set(token)
        if not inserted:
            raise DuplicateId("a document with this _id already exists", details={"_id": doc_id})
        return WriteResult(body, 1, created=True)

    def _insert_batch_runner(
        self, collection: str
    ) -> Callable[[list[_Insert]], Awaitable[list[_Outcome | BaseException]]]:
        key = self._key(collection)
        sql = insert_batch(self._table(collection), self._schema_ident, self.audit, key)

        async def run(items: list[_Insert]) -> list[_Outcome | BaseException]:
            columns = [list(c) for c in zip(*items, strict=True)]
            args = (*columns, collection) if self.audit else tuple(columns)
            try:
                rows = await self._write(collection, sql, *args)
            except (InvalidQuery, DuplicateKey, BadRequest):
                # one bad document (a value the database refuses, a taken unique key) must
                # not fail the others
                return [await self._insert_alone(collection, item) for item in items]
            token = context.write_token.get()
            inserted = {r[0] for r in rows}
            return [(item[0] in inserted, token) for item in items]

        return run

    async def _insert_alone(self, collection: str, item: _Insert) -> _Outcome | BaseException:
        doc_id, body, svc, rid = item
        token = context.current.set(RequestContext(svc, rid))
        try:
            inserted = await self._insert_row(collection, doc_id, body)
            return inserted, context.write_token.get()
        except ProxyError as err:
            return err
        finally:
            context.current.reset(token)

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        """By id; concurrent point reads of one collection share one query (coalescing),
        except reads bound to a consistency token, which are routed one by one."""
        ctx = context.current.get()
        if not self.coalesce or ctx.min_lsn is not None or ctx.partition_key is not None:
            return await super().get(collection, doc_id)
        key = (collection, ctx.read_preference)
        co = self._coalescers.get(key)
        if co is None:
            if len(self._coalescers) > 10_000:
                self._coalescers.clear()
            co = self._coalescers[key] = Coalescer(self._getter(collection))
        return await co.get(doc_id)

    def _getter(self, collection: str) -> FetchMany[str, WriteResult]:
        sql = (
            f"SELECT _id, doc::text, _version FROM {self._table(collection)} "
            "WHERE _id = ANY($1::text[])"
        )

        async def fetch_many(ids: list[str]) -> dict[str, WriteResult]:
            rows = await self._read(collection, sql, ids)
            return {r[0]: WriteResult(r[1].encode(), r[2]) for r in rows or ()}

        return fetch_many

    async def find(self, collection: str, spec: FindSpec) -> Page:
        """Concurrent finds of one shape (the same SQL text) share one statement, a lateral
        join over their parameters; each gets its own page or its own error, by its own
        deadline. Reads bound to a consistency token run alone."""
        ctx = context.current.get()
        if not self.coalesce or ctx.min_lsn is not None or self._key(collection) is not None:
            return await super().find(collection, spec)
        statement = self.find_statement(collection, spec)
        finder = self._finder(collection, ctx.read_preference, ctx.statement_timeout, statement)
        if finder is None:
            rows = await self._read(collection, statement.sql, *statement.args)
            return self.page(spec, statement.plan, rows)
        context.last_statement.set((statement.sql, statement.args))  # its plan, not the batch's
        # No timer of its own (one per request cost ~4 % of a list query's CPU): the wait is
        # bounded already. Every caller of one finder has the same statement timeout (it is
        # in the finder's key), so a later caller's deadline is never earlier; its batch runs
        # in its FIRST caller's context, so the batch's acquire and statement end by that
        # caller's deadline (plus the grace); and a batch it waits behind ends by its own,
        # earlier first caller's. tests/abuse/test_deadline.py holds it on a frozen server.
        rows = await finder.rows(statement.args)
        return self.page(spec, statement.plan, rows)

    def _finder(
        self,
        collection: str,
        preference: str | None,
        timeout: float | None,
        statement: FindStatement,
    ) -> FindCoalescer | None:
        key = (collection, preference, timeout, statement.sql)
        if key in self._finders:
            return self._finders[key]
        if len(self._finders) > 10_000:
            self._finders.clear()
        # only declared shapes: inside the lateral join the planner cannot see the values,
        # and a generic condition (a containment, a subquery) may then lose its index
        batched = batched_sql(statement.sql, statement.plan.order_by("r"))
        finder = None
        if batched is not None and statement.declared:
            finder = FindCoalescer(self._read, collection, statement.sql, batched)
        self._finders[key] = finder
        return finder

    def coalescing(self) -> dict[str, int]:
        finders = [f.coalescer for f in self._finders.values() if f is not None]
        return {
            "batches": sum(c.batches for c in self._coalescers.values()),
            "reads": sum(c.keys for c in self._coalescers.values()),
            "find_batches": sum(c.batches for c in finders),
            "finds": sum(c.keys for c in finders),
        }
