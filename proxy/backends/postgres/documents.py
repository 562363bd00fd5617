"""The document operations shared by the pooled backend and a pinned transaction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import asyncpg

from proxy import context, numbers
from proxy.backends.base import check_collection
from proxy.backends.postgres.aggregate import PgAggregate
from proxy.backends.postgres.ddl import create_table
from proxy.backends.postgres.deadline import GRACE_SECONDS, budget
from proxy.backends.postgres.partitions import PartKey, key_condition, partitioned_upsert, prune
from proxy.backends.postgres.search import PgSearch
from proxy.backends.postgres.sql import insert_documents, with_audit
from proxy.config import Limits
from proxy.errors import (
    BadRequest,
    DuplicateId,
    DuplicateKey,
    InvalidQuery,
    NotFound,
    PreconditionFailed,
    ProxyError,
)
from proxy.ids import IdGenerator
from proxy.query import cursor as cursors
from proxy.query.ast import Filter
from proxy.query.common import kinds_map
from proxy.query.pg import FilterCompiler, Params, UpdateCompiler
from proxy.query.pg_typed import SortPlan, sort_plan
from proxy.query.spec import (
    Change,
    DeclaredKinds,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Preview,
    Replace,
    WriteResult,
)
from proxy.schema.partitioning import parse_partitioning

# an escaped NUL in JSON text: \u0000 preceded by an even number of backslashes
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_CHANGE_NAMES = {Replace: "replace", Modify: "update", MergePatch: "patch"}
_dumps = numbers.dumps_document
_SINGLE_ROW = "VALUES ($1, $2::jsonb, 1)"  # the rows of a one-document insert
# a batch refused for one document's sake: each document alone, so only that one is refused
_ONE_BY_ONE = frozenset({"duplicate_key", "partition_key_missing", "partition_key_out_of_range"})


class PgDocuments(PgAggregate, PgSearch):
    """The document operations, written once over two primitives: ``_write`` (creates the
    table on first use) and ``_read`` (None when the table does not exist). The pooled
    backend and a pinned transaction provide them differently."""

    failure_aborts = False  # a failed statement ends everything after it (a transaction)

    def __init__(
        self,
        name: str,
        limits: Limits,
        schema: str,
        ids: IdGenerator,
        known_tables: set[str],
        audit: bool = True,
        partitioned: dict[str, PartKey] | None = None,
    ) -> None:
        check_collection(schema)
        self.name = name
        self.limits = limits
        self.schema = schema
        self._schema_ident = f'"{schema}"'
        self.ids = ids
        self._known_tables = known_tables
        # partitioned collections, by name: learnt from the declared schemas (and on a
        # collection's first write), shared with this backend's transactions
        self._partitioned = {} if partitioned is None else partitioned
        self.audit = audit
        self._table_names: dict[str, str] = {}
        self._get_sql: dict[str, str] = {}

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        raise NotImplementedError

    async def _read(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        raise NotImplementedError

    async def _analytics(self, collection: str, sql: str, *args: Any) -> list[Any] | None:
        return await self._read(collection, sql, *args)

    def _audited(
        self, sql: str, params: Params, operation: str, collection: str, ctes: str = ""
    ) -> str:
        """Wrap a write (whose RETURNING ends with ``audit_id``) so its audit row is written
        by the same statement: no change without its audit row, one round trip."""
        if not self.audit:
            return f"WITH {ctes} {sql}" if ctes else sql
        ctx = context.current.get()
        svc = params.add(ctx.service, "text")
        op = params.add(operation, "text")
        coll = params.add(collection, "text")
        rid = params.add(ctx.request_id, "text")
        return with_audit(sql, self._schema_ident, svc, op, coll, rid, ctes)

    # -- tables ----------------------------------------------------------------------

    def _table(self, collection: str) -> str:
        table = self._table_names.get(collection)
        if table is None:
            if len(self._table_names) > 10_000:
                self._table_names.clear()
            table = f'{self._schema_ident}."{check_collection(collection)}"'
            self._table_names[collection] = table
        return table

    def _wait(self) -> float:
        """How long the next wait on the database may last (the deadline plus the grace)."""
        left, _ = budget(self.limits)
        return left + GRACE_SECONDS

    async def _ensure_table(self, conn: asyncpg.Connection, collection: str) -> None:
        if collection in self._known_tables:
            return
        spec = await create_table(
            conn, self._table(collection), collection, self._wait(), self._schema_ident
        )
        if spec is not None:
            self._partitioned[collection] = PartKey(spec, self._schema_ident)
        else:
            self._partitioned.pop(collection, None)
        self._known_tables.add(collection)

    async def _learn(self, collection: str) -> None:
        """Before a write's SQL is built: the table exists and its layout is known."""
        raise NotImplementedError

    def _key(self, collection: str) -> PartKey | None:
        return self._partitioned.get(collection)

    def learn_partitioning(self, schemas: dict[str, tuple[int, dict[str, Any]]]) -> None:
        """The partitioned collections among the declared schemas (as loaded)."""
        found: dict[str, PartKey] = {}
        for name, (_, raw) in schemas.items():
            declared = raw.get("partitioning") if isinstance(raw, dict) else None
            if declared:
                found[name] = PartKey(parse_partitioning(declared), self._schema_ident)
        for name in set(self._partitioned) - set(found):
            del self._partitioned[name]
        self._partitioned.update(found)

    # -- documents -------------------------------------------------------------------

    def _prepare(self, doc: dict[str, Any]) -> tuple[str, bytes]:
        doc_id = doc.get("_id")
        if doc_id is None:
            doc_id = self.ids.new()
        body = {"_id": doc_id, **doc, "_version": 1}
        text = _dumps(body)
        if b"\\u0000" in text and _NUL_ESCAPE.search(text):  # jsonb refuses NUL: say so now
            raise InvalidQuery("strings may not contain the NUL character", code="invalid_value")
        return doc_id, text

    async def _insert_row(self, collection: str, doc_id: str, body: str) -> bool:
        """Insert one prepared document (and its audit row); False when the _id is taken."""
        await self._learn(collection)
        params = Params([doc_id, body])
        rows = insert_documents(self._table(collection), _SINGLE_ROW, self._key(collection))
        sql = self._audited(rows, params, "create", collection)
        return bool(await self._write(collection, sql, *params.values))

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        doc_id, body = self._prepare(doc)
        if not await self._insert_row(collection, doc_id, body.decode()):
            raise DuplicateId("a document with this _id already exists", details={"_id": doc_id})
        return WriteResult(body, 1, created=True)

    async def insert_many(self, collection: str, docs: list[dict[str, Any]]) -> list[ItemResult]:
        prepared: list[tuple[str, str] | ItemResult] = []
        for doc in docs:
            try:
                doc_id, body = self._prepare(doc)
                prepared.append((doc_id, body.decode()))
            except ProxyError as err:
                prepared.append(ItemResult(err.status, doc.get("_id"), error=err.to_dict()))
        pairs = [p for p in prepared if isinstance(p, tuple)]
        inserted: set[str] = set()
        if pairs:
            await self._learn(collection)
            rows_sql = "SELECT i, d, 1 FROM unnest($1::text[], $2::jsonb[]) AS u(i, d)"
            sql = insert_documents(self._table(collection), rows_sql, self._key(collection))
            params = Params([[p[0] for p in pairs], [p[1] for p in pairs]])
            sql = self._audited(sql, params, "create", collection)
            try:
                rows = await self._write(collection, sql, *params.values)
            except (DuplicateKey, BadRequest) as err:
                if len(pairs) == 1 or self.failure_aborts or err.code not in _ONE_BY_ONE:
                    raise
                # a taken unique key fails the whole statement: each document alone, so
                # only the one holding it is refused
                return await self._insert_each(collection, prepared)
            inserted = {r[0] for r in rows}
        out: list[ItemResult] = []
        for p in prepared:
            if isinstance(p, ItemResult):
                out.append(p)
            elif p[0] in inserted:
                inserted.discard(p[0])  # a repeated _id in the same batch: first one wins
                out.append(ItemResult(201, p[0], 1))
            else:
                out.append(
                    ItemResult(
                        409,
                        p[0],
                        error=DuplicateId("a document with this _id already exists").to_dict(),
                    )
                )
        return out

    async def _insert_each(
        self, collection: str, prepared: list[tuple[str, str] | ItemResult]
    ) -> list[ItemResult]:
        out: list[ItemResult] = []
        for p in prepared:
            if isinstance(p, ItemResult):
                out.append(p)
                continue
            try:
                if await self._insert_row(collection, p[0], p[1]):
                    out.append(ItemResult(201, p[0], 1))
                else:
                    err = DuplicateId("a document with this _id already exists")
                    out.append(ItemResult(409, p[0], error=err.to_dict()))
            except ProxyError as err:
                if err.status >= 500:
                    raise
                out.append(ItemResult(err.status, p[0], error=err.to_dict()))
        return out

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        key = self._key(collection)
        given = context.current.get().partition_key if key is not None else None
        if key is not None and given is not None:  # one partition: the key is in the plan
            params = Params([doc_id])
            cond = key_condition(key, params, given)
            sql = f"SELECT doc::text, _version FROM {self._table(collection)} t "
            rows = await self._read(collection, sql + f"WHERE _id = $1 AND {cond}", *params.values)
            return WriteResult(rows[0][0].encode(), rows[0][1]) if rows else None
        cached = self._get_sql.get(collection)
        if cached is None:
            cached = f"SELECT doc::text, _version FROM {self._table(collection)} WHERE _id = $1"
            self._get_sql[collection] = cached
        rows = await self._read(collection, cached, doc_id)
        if not rows:
            return None
        return WriteResult(rows[0][0].encode(), rows[0][1])

    async def change(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> WriteResult:
        """Replace, update or patch one document in one statement. ``row_filter`` (row rules)
        must hold for the stored document, else it counts as not found."""
        await self._learn(collection)
        table = self._table(collection)
        key = self._key(collection)
        params = Params([doc_id])
        new_doc = self._new_doc_sql(change, params, "t.doc")
        bump = "jsonb_build_object('_id', t._id, '_version', t._version + 1)"
        set_clause = f"doc = {new_doc} || {bump}, _version = t._version + 1, updated_at = now()"
        if key is not None:  # a changed key moves the row to its partition
            set_clause += f", _pkey = {key.of(new_doc)}"
        conds = self._conditions(params, if_match, row_filter)
        ctes = ""
        if upsert and if_match is None and key is not None:
            first = self._first(change, params)
            ctes, sql = partitioned_upsert(table, key, set_clause, conds, first)
        elif upsert and if_match is None:
            first = self._new_doc_sql(change, params, "jsonb_build_object('_id', $1::text)")
            where = f" WHERE {conds}" if conds else ""
            sql = (
                f"INSERT INTO {table} AS t (_id, doc, _version) VALUES "
                f"($1, {first} || jsonb_build_object('_id', $1::text, '_version', 1), 1) "
                f"ON CONFLICT (_id) DO UPDATE SET {set_clause}{where} "
                "RETURNING t.doc::text, t._version, (t.xmax = 0) AS created, t._id AS audit_id"
            )
        else:
            sql = (
                f"UPDATE {table} AS t SET {set_clause} WHERE t._id = $1"
                f"{' AND ' + conds if conds else ''} "
                "RETURNING t.doc::text, t._version, false, t._id AS audit_id"
            )
        sql = self._audited(sql, params, _CHANGE_NAMES[type(change)], collection, ctes)
        rows = await self._write(collection, sql, *params.values)
        if not rows:
            if upsert and if_match is None:  # the row exists, outside the caller's rows:
                raise NotFound("no document with this _id", details={"_id": doc_id})  # as PUT
            await self._explain_miss(collection, doc_id, if_match, row_filter)
        row = rows[0]
        return WriteResult(row[0].encode(), row[1], created=bool(row[2]))

    async def preview(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        row_filter: Filter | None = None,
    ) -> Preview | None:
        """The stored document and what ``change`` makes of it, in one statement over the
        expressions ``change`` writes with, on the primary (the version it returns is what
        a following If-Match write must find). With ``upsert`` and no document, what the
        insert would store."""
        table = self._table(collection)
        params = Params([doc_id])
        new_doc = self._new_doc_sql(change, params, "t.doc")
        conds = self._conditions(params, None, row_filter)
        sql = (
            f"SELECT t.doc::text, ({new_doc})::text, t._version FROM {table} t "
            f"WHERE t._id = $1{' AND ' + conds if conds else ''}"
        )
        first = ""
        if upsert:
            first = self._new_doc_sql(change, params, "jsonb_build_object('_id', $1::text)")
            sql += (
                f" UNION ALL SELECT NULL, ({first})::text, NULL "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE _id = $1)"
            )
        primary = context.current.set(
            dataclasses.replace(context.current.get(), read_preference="primary", min_lsn=None)
        )
        try:
            rows = await self._read(collection, sql, *params.values)
            if rows is None and upsert:  # no table yet: the document the insert would make
                alone = Params([doc_id])
                first = self._new_doc_sql(change, alone, "jsonb_build_object('_id', $1::text)")
                rows = await self._read(
                    collection, f"SELECT NULL, ({first})::text, NULL", *alone.values
                )
        finally:
            context.current.reset(primary)
        if not rows:
            return None
        old, new, version = rows[0]
        loads = numbers.loads_stored
        return Preview(
            loads(old) if old is not None else None,
            loads(new),
            int(version) if version is not None else None,
        )

    def _first(self, change: Change, params: Params) -> str:
        return self._new_doc_sql(change, params, "jsonb_build_object('_id', $1::text)")

    @staticmethod
    def _conditions(params: Params, if_match: int | None, row_filter: Filter | None) -> str:
        parts = []
        if if_match is not None:
            parts.append(f"t._version = {params.add(if_match, 'bigint')}")
        if row_filter is not None:
            parts.append(FilterCompiler(params).where(row_filter))
        return " AND ".join(parts)

    def _new_doc_sql(self, change: Change, params: Params, base: str) -> str:
        if isinstance(change, Replace):
            ph = params.add(_dumps(change.doc).decode(), "jsonb")
            if change.keep is None:
                return ph
            # kept fields come from the row this statement writes over: no read-modify-write
            keep_open = params.add(sorted(change.keep.open), "text[]")
            partial = params.add(sorted(change.keep.partial), "text[]")
            return f"{self._schema_ident}.dbproxy_keep({base}, {ph}, {keep_open}, {partial}, '')"
        if isinstance(change, Modify):
            return UpdateCompiler(params, self._schema_ident).document_expr(change.update, base)
        assert isinstance(change, MergePatch)
        ph = params.add(_dumps(change.patch).decode(), "jsonb")
        return f"{self._schema_ident}.dbproxy_merge_patch({base}, {ph})"

    async def _explain_miss(
        self, collection: str, doc_id: str, if_match: int | None, row_filter: Filter | None = None
    ) -> None:
        """A write matched no row: say whether the document is missing (or outside the
        caller's rows: the same answer) or its version moved."""
        # ask the primary: a replica could still hold the version the write just missed
        primary = context.current.set(
            dataclasses.replace(context.current.get(), read_preference="primary", min_lsn=None)
        )
        try:
            moved = if_match is not None and await self._visible_version(
                collection, doc_id, row_filter
            )
        finally:
            context.current.reset(primary)
        if moved:
            raise PreconditionFailed(
                "the document's version does not match If-Match", code="version_mismatch"
            )
        raise NotFound("no document with this _id", details={"_id": doc_id})

    async def _visible_version(
        self, collection: str, doc_id: str, row_filter: Filter | None
    ) -> bool:
        if row_filter is None:
            return await self.get(collection, doc_id) is not None
        params = Params([doc_id])
        where = FilterCompiler(params).where(row_filter)
        sql = f"SELECT 1 FROM {self._table(collection)} t WHERE t._id = $1 AND {where}"
        return bool(await self._read(collection, sql, *params.values))

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> int:
        await self._learn(collection)
        params = Params([doc_id])
        conds = self._conditions(params, if_match, row_filter)
        sql = self._audited(
            f"DELETE FROM {self._table(collection)} t WHERE t._id = $1"
            f"{' AND ' + conds if conds else ''} RETURNING t._version, t._id AS audit_id",
            params,
            "delete",
            collection,
        )
        rows = await self._write(collection, sql, *params.values)  # the primary, never a replica
        if not rows:
            await self._explain_miss(collection, doc_id, if_match, row_filter)
            raise AssertionError("unreachable")
        return int(rows[0][0])

    def find_statement(self, collection: str, spec: FindSpec) -> FindStatement:
        """The SQL text and arguments of a find (what ``find`` runs; tests EXPLAIN it)."""
        params = Params()
        kinds = kinds_map(spec.kinds) if spec.kinds else None
        compiler = FilterCompiler(params, kinds)
        where = self._pruned(collection, compiler.where(spec.filter), spec.filter, params)
        plan = sort_plan(spec.sort, params.add, kinds)
        if spec.cursor is not None:
            where = f"{where} AND {plan.after(plan.decode(spec.cursor), params.add)}"
        keys = ", ".join(f"{e} AS k{i}" for i, (e, _) in enumerate(plan.exprs))
        limit = params.add(spec.limit + 1, "bigint")
        offset = params.add(spec.skip, "bigint")
        sql = (
            f"SELECT t.doc::text, {keys} FROM {self._table(collection)} t WHERE {where} "
            f"ORDER BY {plan.order_by()} LIMIT {limit} OFFSET {offset}"
        )
        return FindStatement(sql, tuple(params.values), plan, compiler.all_typed)

    def _pruned(self, collection: str, where: str, flt: Filter, params: Params) -> str:
        """``where`` with the partition-key conditions ``flt`` implies (pruning)."""
        key = self._key(collection)
        extra = prune(key, flt, params) if key is not None else None
        return f"{where} AND {extra}" if extra else where

    async def find(self, collection: str, spec: FindSpec) -> Page:
        statement = self.find_statement(collection, spec)
        rows = await self._read(collection, statement.sql, *statement.args)
        return self.page(spec, statement.plan, rows)

    @staticmethod
    def page(spec: FindSpec, plan: SortPlan, rows: Sequence[Sequence[Any]] | None) -> Page:
        """The page of a find's rows (``doc``, then the sort keys); ``next`` when one more
        row than the limit came back."""
        if not rows:
            return Page([], None)
        more = len(rows) > spec.limit
        rows = rows[: spec.limit]
        nxt = None
        if more:
            last = rows[-1]
            nxt = cursors.encode(plan.tag, [last[i + 1] for i in range(len(plan.exprs))])
        return Page([r[0].encode() for r in rows], nxt)

    async def count(self, collection: str, flt: Filter, *, kinds: DeclaredKinds = ()) -> int:
        params = Params()
        where = FilterCompiler(params, kinds_map(kinds) if kinds else None).where(flt)
        where = self._pruned(collection, where, flt, params)
        sql = f"SELECT count(*) FROM {self._table(collection)} t WHERE {where}"
        rows = await self._read(collection, sql, *params.values)
        return int(rows[0][0]) if rows else 0


@dataclasses.dataclass(frozen=True, slots=True)
class FindStatement:
    """One find as SQL: text (its shape), bound arguments, and the sort it orders by."""

    sql: str
    args: tuple[Any, ...]
    plan: SortPlan
    # every condition is on a declared path's expression: a plan that does not depend on
    # the values much (an index on the path), so the statement may be batched (coalescing)
    declared: bool = False
