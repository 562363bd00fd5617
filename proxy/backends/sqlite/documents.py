"""The document operations of the SQLite store, written once for the backend and its
transactions."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy import context, numbers
from proxy.backends.sqlite.aggregate import SqliteAggregate
from proxy.backends.sqlite.connection import FN_KEEP, Job, T, keep_text
from proxy.backends.sqlite.ddl import AUDIT_INSERT, NOW, table_name
from proxy.backends.sqlite.errors import no_table, translate
from proxy.backends.sqlite.search import SqliteSearch
from proxy.config import Limits
from proxy.errors import DuplicateId, DuplicateKey, NotFound, PreconditionFailed, ProxyError
from proxy.ids import IdGenerator
from proxy.query import sqlite as dialect
from proxy.query.ast import Filter
from proxy.query.common import kinds_map
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
from proxy.query.sqlite import (
    FilterCompiler,
    Names,
    Params,
    UpdateCompiler,
    after_cursor,
    decode_cursor,
    encode_cursor,
    sort_exprs,
)

_INT64_MAX = 2**63 - 1
_CHANGE_NAMES = {Replace: "replace", Modify: "update", MergePatch: "patch"}


def _insert_sql(table: str) -> str:
    """A new document (``?1`` its _id, ``?2`` its JSON); no row when the _id exists."""
    return f"INSERT INTO {table} (_id, doc) VALUES (?1, ?2) ON CONFLICT (_id) DO NOTHING"


def _version_param(if_match: int) -> int:
    """If-Match as a bindable integer; one no version can have when out of range."""
    return if_match if 0 < if_match <= _INT64_MAX else -1


class SqliteDocuments(SqliteAggregate, SqliteSearch):
    """The document operations, written once over two primitives: ``_write`` (a job that
    may create the collection's table) and ``_read``. The backend runs them on its writer
    and readers, a transaction on its own connection."""

    def __init__(self, name: str, limits: Limits, ids: IdGenerator, audit: bool) -> None:
        self.name = name
        self.limits = limits
        self.ids = ids
        self.audit = audit
        self.wrote = False  # an audited change ran (set on the thread that ran it)

    async def _write(self, collection: str | None, fn: Job[T]) -> T:
        """Run a write job; with ``collection``, its table exists when ``fn`` runs."""
        raise NotImplementedError

    async def _read(self, fn: Job[T]) -> T:
        raise NotImplementedError

    def _audited(
        self, fn: Job[T], operation: str, collection: str, written: Callable[[T], list[str]]
    ) -> Job[T]:
        """``fn`` followed, in the same job (savepoint or transaction), by its audit row
        when it changed documents: no change without its audit row, and no audit row for
        a change that failed or was rolled back. Who asks is read here, on the event loop:
        the context does not follow the job into the thread that runs it."""
        if not self.audit:
            return fn
        ctx = context.current.get()
        service, request_id = ctx.service, ctx.request_id

        def job(conn: sqlite3.Connection) -> T:
            result = fn(conn)
            ids = written(result)
            if ids:
                row = (time.time(), service, operation, collection, orjson.dumps(ids).decode())
                conn.execute(AUDIT_INSERT, (*row, request_id))
                self.wrote = True
            return result

        return job

    @staticmethod
    def _reading(fn: Job[T], empty: T) -> Job[T]:
        """A read job; ``empty`` when the collection has no table yet."""

        def job(conn: sqlite3.Connection) -> T:
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    return empty
                raise

        return job

    def _prepare(self, doc: dict[str, Any]) -> tuple[str, bytes]:
        doc_id = doc.get("_id")
        if doc_id is None:
            doc_id = self.ids.new()
        return doc_id, self._dump({"_id": doc_id, **doc, "_version": 1})

    @staticmethod
    def _dump(value: dict[str, Any]) -> bytes:
        body = numbers.dumps_document(value)
        if b"\\u0000" in body:
            dialect.json_text(value)  # refuses a real NUL (PostgreSQL's jsonb cannot hold it)
        return body

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        table = table_name(collection)
        doc_id, body = self._prepare(doc)
        sql = _insert_sql(table)

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, (doc_id, body.decode())).rowcount != 1:
                raise DuplicateId(
                    "a document with this _id already exists", details={"_id": doc_id}
                )

        await self._write(collection, self._audited(run, "create", collection, lambda _: [doc_id]))
        return WriteResult(body, 1, created=True)

    async def insert_many(self, collection: str, docs: list[dict[str, Any]]) -> list[ItemResult]:
        table = table_name(collection)
        prepared: list[tuple[str, str] | ItemResult] = []
        for doc in docs:
            try:
                doc_id, body = self._prepare(doc)
                prepared.append((doc_id, body.decode()))
            except ProxyError as err:
                prepared.append(ItemResult(err.status, doc.get("_id"), error=err.to_dict()))
        pairs = [p for p in prepared if isinstance(p, tuple)]
        sql = _insert_sql(table)

        def run(conn: sqlite3.Connection) -> list[bool | ProxyError]:
            # a repeated _id in the same batch: the first one wins, as in PostgreSQL; a
            # taken unique key refuses its own document only (the statement is undone alone)
            done: list[bool | ProxyError] = []
            for pair in pairs:
                try:
                    done.append(conn.execute(sql, pair).rowcount == 1)
                except sqlite3.IntegrityError as exc:
                    err = translate(exc)
                    if not isinstance(err, DuplicateKey):
                        raise
                    done.append(err)
            return done

        def written(done: list[bool | ProxyError]) -> list[str]:
            return [pair[0] for pair, ok in zip(pairs, done, strict=True) if ok is True]

        job = self._audited(run, "create", collection, written)
        inserted = iter(await self._write(collection, job) if pairs else [])
        duplicate = DuplicateId("a document with this _id already exists").to_dict()
        out: list[ItemResult] = []
        for p in prepared:
            if isinstance(p, ItemResult):
                out.append(p)
            elif (ok := next(inserted)) is True:
                out.append(ItemResult(201, p[0], 1))
            elif isinstance(ok, ProxyError):
                out.append(ItemResult(ok.status, p[0], error=ok.to_dict()))
            else:
                out.append(ItemResult(409, p[0], error=duplicate))
        return out

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        sql = f"SELECT CAST(doc AS BLOB), _version FROM {table_name(collection)} WHERE _id = ?1"

        def run(conn: sqlite3.Connection) -> WriteResult | None:
            row = conn.execute(sql, (doc_id,)).fetchone()
            return None if row is None else WriteResult(row[0], row[1])

        return await self._read(self._reading(run, None))

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
        table = table_name(collection)
        params = Params([doc_id])
        names = Names()
        new_doc = self._new_doc_sql(change, params, names, doc_id, "t.doc")
        set_clause = (
            f"doc = json_set({new_doc}, '$.\"_id\"', t._id, '$.\"_version\"', t._version + 1), "
            f"_version = t._version + 1, updated_at = {NOW}"
        )
        returning = "RETURNING CAST(doc AS BLOB), _version"
        conds = self._conditions(params, names, if_match, row_filter)
        inserting = upsert and if_match is None
        if inserting:
            first = self._new_doc_sql(change, params, names, doc_id, "json_object('_id', ?1)")
            sql = (
                f"INSERT INTO {table} AS t (_id, doc) VALUES "
                f"(?1, json_set({first}, '$.\"_id\"', ?1, '$.\"_version\"', 1)) "
                f"ON CONFLICT (_id) DO UPDATE SET {set_clause}"
                f"{' WHERE ' + conds if conds else ''} {returning}"
            )
        else:
            sql = (
                f"UPDATE {table} AS t SET {set_clause} WHERE t._id = ?1"
                f"{' AND ' + conds if conds else ''} {returning}"
            )
        values = params.values
        visible = self._visible_sql(table, row_filter)

        def run(conn: sqlite3.Connection) -> WriteResult:
            row = conn.execute(sql, values).fetchone()
            if row is None:
                if inserting:  # the row exists, outside the caller's rows: as a plain
                    raise NotFound("no document with this _id", details={"_id": doc_id})
                self._explain_miss(conn, visible, doc_id, if_match)
            return WriteResult(row[0], row[1], created=inserting and row[1] == 1)

        operation = _CHANGE_NAMES[type(change)]
        return await self._write(
            collection, self._audited(run, operation, collection, lambda _: [doc_id])
        )

    async def preview(
        self,
        collection: str,
        doc_id: str,
        change: Change,
        *,
        upsert: bool = False,
        row_filter: Filter | None = None,
    ) -> Preview | None:
        """The stored document and what ``change`` makes of it, computed by one SELECT over
        the expressions ``change`` writes with; with ``upsert`` and no document, what the
        insert would store."""
        table = table_name(collection)
        params = Params([doc_id])
        names = Names()
        new_doc = self._new_doc_sql(change, params, names, doc_id, "t.doc")
        conds = self._conditions(params, names, None, row_filter)
        sql = (
            f"SELECT CAST(t.doc AS BLOB), CAST({new_doc} AS BLOB), t._version FROM {table} t "
            f"WHERE t._id = ?1{' AND ' + conds if conds else ''}"
        )
        values = params.values
        first_sql, first_values = "", []
        if upsert:
            alone = Params([doc_id])
            first = self._new_doc_sql(change, alone, Names(), doc_id, "json_object('_id', ?1)")
            first_sql, first_values = f"SELECT CAST({first} AS BLOB)", alone.values

        def run(conn: sqlite3.Connection) -> Preview | None:
            try:
                row = conn.execute(sql, values).fetchone()
            except sqlite3.OperationalError as exc:
                if not no_table(exc):
                    raise
                row = None
                exists = False
            else:
                exists = row is not None or bool(
                    conn.execute(f"SELECT 1 FROM {table} WHERE _id = ?1", (doc_id,)).fetchone()
                )
            if row is not None:
                loads = numbers.loads_stored
                return Preview(loads(row[0]), loads(row[1]), int(row[2]))
            if not upsert or exists:
                return None
            made = conn.execute(first_sql, first_values).fetchone()
            return Preview(None, numbers.loads_stored(made[0]), None)

        return await self._read(run)

    @staticmethod
    def _conditions(
        params: Params, names: Names, if_match: int | None, row_filter: Filter | None
    ) -> str:
        parts = []
        if if_match is not None:
            parts.append(f"t._version = {params.add(_version_param(if_match))}")
        if row_filter is not None:
            parts.append(FilterCompiler(params, names).where(row_filter))
        return " AND ".join(parts)

    @staticmethod
    def _visible_sql(table: str, row_filter: Filter | None) -> tuple[str, list[Any]]:
        """A query finding the document ``?1`` among the caller's rows."""
        if row_filter is None:
            return f"SELECT 1 FROM {table} t WHERE t._id = ?1", []
        params = Params([None])
        where = FilterCompiler(params).where(row_filter)
        return f"SELECT 1 FROM {table} t WHERE t._id = ?1 AND {where}", params.values[1:]

    @staticmethod
    def _new_doc_sql(change: Change, params: Params, names: Names, doc_id: str, base: str) -> str:
        if isinstance(change, Replace):
            body = params.add(SqliteDocuments._dump({"_id": doc_id, **change.doc}).decode())
            if change.keep is None:
                return body
            # kept fields come from the row this statement writes over: no read-modify-write
            return f"{FN_KEEP}({base}, {body}, {params.add(keep_text(change.keep))})"
        if isinstance(change, Modify):
            return UpdateCompiler(params, names).document_expr(change.update, base)
        assert isinstance(change, MergePatch)
        return f"json_patch({base}, {params.add(SqliteDocuments._dump(change.patch).decode())})"

    @staticmethod
    def _explain_miss(
        conn: sqlite3.Connection, visible: tuple[str, list[Any]], doc_id: str, if_match: int | None
    ) -> None:
        """A write matched no row: say whether the document is missing (or outside the
        caller's rows: the same answer) or its version moved. In the same transaction, so
        the answer is consistent."""
        if if_match is not None:
            sql, values = visible
            found = conn.execute(sql, [doc_id, *values]).fetchone()
            if found is not None:
                raise PreconditionFailed(
                    "the document's version does not match If-Match", code="version_mismatch"
                )
        raise NotFound("no document with this _id", details={"_id": doc_id})

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        row_filter: Filter | None = None,
    ) -> int:
        table = table_name(collection)
        params = Params([doc_id])
        conds = self._conditions(params, Names(), if_match, row_filter)
        sql = (
            f"DELETE FROM {table} AS t WHERE t._id = ?1{' AND ' + conds if conds else ''} "
            "RETURNING _version"
        )
        values = params.values
        visible = self._visible_sql(table, row_filter)

        def run(conn: sqlite3.Connection) -> int:
            try:
                row = conn.execute(sql, values).fetchone()
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    raise NotFound("no document with this _id", details={"_id": doc_id}) from None
                raise
            if row is None:
                self._explain_miss(conn, visible, doc_id, if_match)
            return int(row[0])

        return await self._write(None, self._audited(run, "delete", collection, lambda _: [doc_id]))

    def find_statement(self, collection: str, spec: FindSpec) -> tuple[str, list[Any], int]:
        """The SQL text and arguments of a find (what ``find`` runs; tests EXPLAIN it), and
        how many sort keys follow the document in each row."""
        params = Params()
        names = Names()
        kinds = kinds_map(spec.kinds) if spec.kinds else None
        where = FilterCompiler(params, names, kinds).where(spec.filter)
        exprs = sort_exprs(spec.sort, params, names=names, kinds=kinds)
        if spec.cursor is not None:
            cursor_values = decode_cursor(spec.cursor, spec.sort, kinds)
            after = after_cursor(exprs, cursor_values, params, spec.sort, kinds)
            where = f"{where} AND {after}"
        keys = ", ".join(f"{e} AS k{i}" for i, (e, _) in enumerate(exprs))
        order = ", ".join(f"k{i} DESC" if desc else f"k{i}" for i, (_, desc) in enumerate(exprs))
        limit = params.add(spec.limit + 1)
        offset = params.add(spec.skip)
        sql = (
            f"SELECT CAST(t.doc AS BLOB), {keys} FROM {table_name(collection)} t WHERE {where} "
            f"ORDER BY {order} LIMIT {limit} OFFSET {offset}"
        )
        return sql, params.values, len(exprs)

    async def find(self, collection: str, spec: FindSpec) -> Page:
        sql, values, n_keys = self.find_statement(collection, spec)
        context.last_statement.set((sql, tuple(values)))  # its plan: index_used

        def run(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql, values).fetchall()

        no_rows: list[Any] = []
        rows = await self._read(self._reading(run, no_rows))
        if not rows:
            return Page([], None)
        more = len(rows) > spec.limit
        rows = rows[: spec.limit]
        nxt = None
        if more:
            last = rows[-1]
            nxt = encode_cursor(
                spec.sort,
                [last[i + 1] for i in range(n_keys)],
                kinds_map(spec.kinds) if spec.kinds else None,
            )
        return Page([r[0] for r in rows], nxt)

    async def count(self, collection: str, flt: Filter, *, kinds: DeclaredKinds = ()) -> int:
        params = Params()
        where = FilterCompiler(params, kinds=kinds_map(kinds) if kinds else None).where(flt)
        sql = f"SELECT count(*) FROM {table_name(collection)} t WHERE {where}"
        values = params.values
        context.last_statement.set((sql, tuple(values)))

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, values).fetchone()[0])

        return await self._read(self._reading(run, 0))
