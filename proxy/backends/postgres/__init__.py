"""PostgreSQL backend: one jsonb table per collection, reached through an asyncpg pool.

The only module that imports asyncpg. Every driver error is translated here into the
error hierarchy of ``proxy.errors``; no SQL or driver text leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import orjson

from proxy import context, numbers
from proxy.backends.base import Capabilities, TransactionShare, TxKind, check_collection
from proxy.backends.postgres.coalesce import Batcher, Coalescer, FetchMany
from proxy.backends.postgres.pool import CONNECTION_ERRORS, Endpoint, EndpointSet, release
from proxy.config import DatabaseConfig, Limits
from proxy.context import RequestContext
from proxy.errors import (
    BadRequest,
    CommitOutcomeUnknown,
    Conflict,
    DatabaseTimeout,
    DuplicateId,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    NotFound,
    NumberOutOfRange,
    PoolExhausted,
    PreconditionFailed,
    ProxyError,
    Timeout,
    Unavailable,
)
from proxy.ids import IdGenerator
from proxy.query import cursor as cursors
from proxy.query.ast import Filter
from proxy.query.pg import (
    HELPER_FUNCTIONS,
    FilterCompiler,
    Params,
    UpdateCompiler,
    after_cursor,
    key_casts,
    order_by,
    sort_exprs,
)
from proxy.query.spec import (
    AuditScope,
    Change,
    FindSpec,
    ItemResult,
    MergePatch,
    Modify,
    Page,
    Replace,
    StoredReply,
    WriteResult,
    check_fingerprint,
)

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = CONNECTION_ERRORS  # the one list, in proxy.backends.postgres.pool
_REFUSALS = frozenset({"array_index_too_large"})  # codes dbproxy_refuse() may raise
_CAST_KINDS: dict[str, type] = {"int": int, "text": str, "jsonb": str}
# how long past a request's deadline the client still waits for the server: long enough for
# PostgreSQL's own statement_timeout (same length, counted from the statement's start) to
# cancel the statement first when the server is alive, so a frozen server costs only this
GRACE_SECONDS = 0.5
# an escaped NUL in JSON text: \u0000 preceded by an even number of backslashes
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_Insert = tuple[str, str, str, str]  # _id, document JSON, service, request id
_CHANGE_NAMES = {Replace: "replace", Modify: "update", MergePatch: "patch"}
# A full replacement keeping what the caller may not write: proxy.ops.keep_protected's twin.
KEEP_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.dbproxy_keep(
  stored jsonb, body jsonb, open_paths text[], partial_paths text[], prefix text
) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE k text; v jsonb; result jsonb;
BEGIN
  IF stored IS NULL OR jsonb_typeof(stored) <> 'object' THEN RETURN body; END IF;
  SELECT body || coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb) INTO result
    FROM jsonb_each(stored) e
   WHERE NOT (prefix = '' AND e.key IN ('_id', '_version')) AND NOT (body ? e.key)
     AND NOT ((prefix || e.key) = ANY(open_paths) OR (prefix || e.key) = ANY(partial_paths));
  FOR k, v IN SELECT e.key, e.value FROM jsonb_each(stored) e
   WHERE NOT (prefix = '' AND e.key IN ('_id', '_version'))
     AND (prefix || e.key) = ANY(partial_paths) AND NOT ((prefix || e.key) = ANY(open_paths))
  LOOP
    IF NOT (body ? k) THEN
      IF jsonb_typeof(v) = 'object' THEN
        v := {schema}.dbproxy_keep(v, '{{}}'::jsonb, open_paths, partial_paths, prefix || k || '.');
      END IF;
      result := result || jsonb_build_object(k, v);
    ELSIF jsonb_typeof(v) = 'object' AND jsonb_typeof(body -> k) = 'object' THEN
      result := result || jsonb_build_object(
        k, {schema}.dbproxy_keep(v, body -> k, open_paths, partial_paths, prefix || k || '.'));
    END IF;
  END LOOP;
  RETURN result;
END $f$;
"""
AUDIT_DDL = """
CREATE TABLE IF NOT EXISTS {schema}._audit (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  service text NOT NULL,
  operation text NOT NULL,
  collection text NOT NULL,
  ids text[] NOT NULL,
  request_id text NOT NULL,
  outcome text NOT NULL DEFAULT 'committed'
);
CREATE INDEX IF NOT EXISTS _audit_at ON {schema}._audit (at);
"""


def budget(limits: Limits) -> tuple[float, bool]:
    """Seconds left for the current request's database work (its deadline is its start plus
    its statement timeout), and whether that timeout is the global one, so running out of
    it means the server did not answer (False: a per-service cap below it ran out)."""
    ctx = context.current.get()
    cap = ctx.statement_timeout
    hard = cap is None or cap >= limits.statement_timeout_seconds
    limit = limits.statement_timeout_seconds if hard or cap is None else cap
    if ctx.started is None:
        return limit, hard
    return ctx.started + limit - time.monotonic(), hard


def _no_answer() -> DatabaseTimeout:
    return DatabaseTimeout("the database did not answer within the request's deadline")


def translate(exc: BaseException) -> ProxyError:
    """Map a driver exception to a client-facing error (retryable or not)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return Timeout("the statement took longer than the configured timeout")
    if isinstance(exc, asyncio.TimeoutError):  # the client gave up: the server never answered
        return _no_answer()
    if isinstance(
        exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError
    ):
        return Conflict(
            "the transaction conflicted with a concurrent one; retry it",
            code="serialization_failure",
            retryable=True,
        )
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return DuplicateId("a document with this _id already exists")
    if isinstance(exc, _CONNECTION_ERRORS):
        return Unavailable("the database is not reachable", retry_after=1)
    if isinstance(exc, asyncpg.PostgresError):
        return _translate_sqlstate(exc)
    return InternalError("unexpected error while talking to the database")


_dumps = numbers.dumps_document


MISSING_RETRY_AFTER = 5.0  # seconds: a missing database is a configuration problem


def dsn_database(dsn: str) -> str | None:
    """The database a ``postgresql://`` URL names (path, or ``dbname``/``database``), for
    messages; None when it names none (then libpq's default, the user name, applies)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        query = parse_qs(parts.query)
        name = (query.get("dbname") or query.get("database") or [""])[0]
    name = name[:63]
    return name if name and name.isprintable() else None


def _translate_sqlstate(exc: asyncpg.PostgresError) -> ProxyError:
    state = getattr(exc, "sqlstate", "") or ""
    if state == "DP002":  # raised by dbproxy_number inside the update statement
        return NumberOutOfRange(getattr(exc, "message", "") or "a number is out of range")
    if state == "DP003" and getattr(exc, "detail", None) in _REFUSALS:  # dbproxy_refuse
        return InvalidQuery(getattr(exc, "message", "") or "refused", code=exc.detail)
    if state == "DP001":
        return InvalidQuery(
            f"the update does not fit the stored document: {getattr(exc, 'message', '')}",
            code="update_type_mismatch",
        )
    if state == "2201B":
        return InvalidQuery("invalid regular expression", code="invalid_regex")
    if state in ("22P02", "22023"):
        return InvalidQuery(
            "the operation does not fit the stored document's structure",
            code="update_type_mismatch",
        )
    if state == "22P05":
        return InvalidQuery("strings may not contain the NUL character", code="invalid_value")
    if state.startswith("22"):
        return InvalidQuery("a value is out of range for the database", code="invalid_value")
    if state.startswith("54"):
        return LimitExceeded("the request is too complex for the database", code="too_complex")
    if state.startswith("53") or state.startswith("57P"):
        return Unavailable("the database is overloaded or shutting down", retry_after=1)
    if state == "3D000":
        return Unavailable("the database does not exist", retry_after=MISSING_RETRY_AFTER)
    log.error("unexpected database error sqlstate=%s type=%s", state, type(exc).__name__)
    return InternalError("unexpected database error")


def _glob_to_posix(glob: str) -> str:
    """A policy glob (name characters, ``*``, ``?``, ``[...]``, ``[!...]``) as an anchored
    POSIX regex (the policy loader allows nothing else in a glob)."""
    out = glob.replace("*", ".*").replace("?", ".").replace("[!", "[^")
    return f"^{out}$"


class _Documents:
    """The document operations, written once over two primitives: ``_write`` (creates the
    table on first use) and ``_read`` (None when the table does not exist). The pooled
    backend and a pinned transaction provide them differently."""

    def __init__(
        self,
        name: str,
        limits: Limits,
        schema: str,
        ids: IdGenerator,
        known_tables: set[str],
        audit: bool = True,
    ) -> None:
        check_collection(schema)
        self.name = name
        self.limits = limits
        self.schema = schema
        self._schema_ident = f'"{schema}"'
        self.ids = ids
        self._known_tables = known_tables
        self.audit = audit
        self._table_names: dict[str, str] = {}
        self._get_sql: dict[str, str] = {}

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        raise NotImplementedError

    async def _read(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        raise NotImplementedError

    def _audited(self, sql: str, params: Params, operation: str, collection: str) -> str:
        """Wrap a write (whose RETURNING ends with ``audit_id``) so its audit row is written
        by the same statement: no change without its audit row, one round trip."""
        if not self.audit:
            return sql
        ctx = context.current.get()
        svc = params.add(ctx.service, "text")
        op = params.add(operation, "text")
        coll = params.add(collection, "text")
        rid = params.add(ctx.request_id, "text")
        return (
            f"WITH w AS ({sql}), a AS (INSERT INTO {self._schema_ident}._audit "
            "(service, operation, collection, ids, request_id) "
            f"SELECT {svc}, {op}, {coll}, array_agg(w.audit_id), {rid} FROM w "
            "HAVING count(*) > 0) SELECT * FROM w"
        )

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
        table = self._table(collection)
        index = "gin_" + hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()
        # bounded as a whole: a frozen server must not hold the request (nor the ROLLBACK)
        async with asyncio.timeout(max(self._wait(), 0.001)), conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"dbproxy:{collection}"
            )
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                '_id text COLLATE "C" PRIMARY KEY, doc jsonb NOT NULL, '
                "_version bigint NOT NULL DEFAULT 1, "
                "created_at timestamptz NOT NULL DEFAULT now(), "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            )
            await conn.execute(
                f'CREATE INDEX IF NOT EXISTS "{index}" ON {table} USING gin (doc jsonb_path_ops)'
            )
        self._known_tables.add(collection)

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

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        doc_id, body = self._prepare(doc)
        params = Params([doc_id, body.decode()])
        sql = self._audited(
            f"INSERT INTO {self._table(collection)} (_id, doc, _version) "
            "VALUES ($1, $2::jsonb, 1) ON CONFLICT (_id) DO NOTHING RETURNING _id AS audit_id",
            params,
            "create",
            collection,
        )
        rows = await self._write(collection, sql, *params.values)
        if not rows:
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
            sql = (
                f"INSERT INTO {self._table(collection)} (_id, doc, _version) "
                "SELECT i, d, 1 FROM unnest($1::text[], $2::jsonb[]) AS u(i, d) "
                "ON CONFLICT (_id) DO NOTHING RETURNING _id AS audit_id"
            )
            params = Params([[p[0] for p in pairs], [p[1] for p in pairs]])
            sql = self._audited(sql, params, "create", collection)
            rows = await self._write(collection, sql, *params.values)
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

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        sql = self._get_sql.get(collection)
        if sql is None:
            sql = f"SELECT doc::text, _version FROM {self._table(collection)} WHERE _id = $1"
            self._get_sql[collection] = sql
        rows = await self._read(collection, sql, doc_id)
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
        guard: Filter | None = None,
    ) -> WriteResult:
        """Replace, update or patch one document in one statement. ``guard`` (row rules)
        must hold for the stored document, else it counts as not found."""
        table = self._table(collection)
        params = Params([doc_id])
        new_doc = self._new_doc_sql(change, params, "t.doc")
        bump = "jsonb_build_object('_id', t._id, '_version', t._version + 1)"
        set_clause = f"doc = {new_doc} || {bump}, _version = t._version + 1, updated_at = now()"
        conds = self._conditions(params, if_match, guard)
        if upsert and if_match is None:
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
        sql = self._audited(sql, params, _CHANGE_NAMES[type(change)], collection)
        rows = await self._write(collection, sql, *params.values)
        if not rows:
            if upsert and if_match is None:  # the row exists, outside the caller's rows:
                raise NotFound("no document with this _id", details={"_id": doc_id})  # as PUT
            await self._explain_miss(collection, doc_id, if_match, guard)
        row = rows[0]
        return WriteResult(row[0].encode(), row[1], created=bool(row[2]))

    @staticmethod
    def _conditions(params: Params, if_match: int | None, guard: Filter | None) -> str:
        parts = []
        if if_match is not None:
            parts.append(f"t._version = {params.add(if_match, 'bigint')}")
        if guard is not None:
            parts.append(FilterCompiler(params).where(guard))
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
        self, collection: str, doc_id: str, if_match: int | None, guard: Filter | None = None
    ) -> None:
        """A write matched no row: say whether the document is missing (or outside the
        caller's rows: the same answer) or its version moved."""
        # ask the primary: a replica could still hold the version the write just missed
        primary = context.current.set(
            dataclasses.replace(context.current.get(), read_preference="primary", min_lsn=None)
        )
        try:
            moved = if_match is not None and await self._visible_version(collection, doc_id, guard)
        finally:
            context.current.reset(primary)
        if moved:
            raise PreconditionFailed(
                "the document's version does not match If-Match", code="version_mismatch"
            )
        raise NotFound("no document with this _id", details={"_id": doc_id})

    async def _visible_version(self, collection: str, doc_id: str, guard: Filter | None) -> bool:
        if guard is None:
            return await self.get(collection, doc_id) is not None
        params = Params([doc_id])
        where = FilterCompiler(params).where(guard)
        sql = f"SELECT 1 FROM {self._table(collection)} t WHERE t._id = $1 AND {where}"
        return bool(await self._read(collection, sql, *params.values))

    async def delete(
        self,
        collection: str,
        doc_id: str,
        *,
        if_match: int | None = None,
        guard: Filter | None = None,
    ) -> int:
        params = Params([doc_id])
        conds = self._conditions(params, if_match, guard)
        sql = self._audited(
            f"DELETE FROM {self._table(collection)} t WHERE t._id = $1"
            f"{' AND ' + conds if conds else ''} RETURNING t._version, t._id AS audit_id",
            params,
            "delete",
            collection,
        )
        rows = await self._write(collection, sql, *params.values)  # the primary, never a replica
        if not rows:
            await self._explain_miss(collection, doc_id, if_match, guard)
            raise AssertionError("unreachable")
        return int(rows[0][0])

    async def find(self, collection: str, spec: FindSpec) -> Page:
        params = Params()
        where = FilterCompiler(params).where(spec.filter)
        exprs = sort_exprs(spec.sort, params)
        casts = key_casts(len(spec.sort))
        if spec.cursor is not None:
            tag = cursors.sort_tag(repr(spec.sort))
            values = cursors.decode(spec.cursor, tag, [_CAST_KINDS[c] for c in casts])
            where = f"{where} AND {after_cursor(exprs, values, params)}"
        keys = ", ".join(f"{e} AS k{i}" for i, (e, _) in enumerate(exprs))
        limit = params.add(spec.limit + 1, "bigint")
        offset = params.add(spec.skip, "bigint")
        sql = (
            f"SELECT t.doc::text, {keys} FROM {self._table(collection)} t WHERE {where} "
            f"ORDER BY {order_by(exprs)} LIMIT {limit} OFFSET {offset}"
        )
        rows = await self._read(collection, sql, *params.values)
        if not rows:
            return Page([], None)
        more = len(rows) > spec.limit
        rows = rows[: spec.limit]
        nxt = None
        if more:
            last = rows[-1]
            tag = cursors.sort_tag(repr(spec.sort))
            nxt = cursors.encode(tag, [last[i + 1] for i in range(len(exprs))])
        return Page([r[0].encode() for r in rows], nxt)

    async def count(self, collection: str, flt: Filter) -> int:
        params = Params()
        where = FilterCompiler(params).where(flt)
        sql = f"SELECT count(*) FROM {self._table(collection)} t WHERE {where}"
        rows = await self._read(collection, sql, *params.values)
        return int(rows[0][0]) if rows else 0


class PostgresBackend(_Documents):
    """Documents in ``<schema>."<collection>"``: _id text PK, doc jsonb, _version, timestamps.

    Statements go to the endpoint the router picks: writes and transactions to the primary,
    reads by preference (and consistency token) to a replica or the primary."""

    capabilities = Capabilities(
        explain=True, describe_collections=True, audit_log=True, endpoints=True, coalesce=True
    )

    def __init__(
        self,
        config: DatabaseConfig,
        limits: Limits,
        *,
        schema: str = "dbproxy",
        ids: IdGenerator | None = None,
        audit: bool = True,
        endpoints: EndpointSet | None = None,
        coalesce: bool = True,
    ) -> None:
        super().__init__(config.name, limits, schema, ids or IdGenerator(), set(), audit)
        self.config = config
        self.coalesce = coalesce
        self._coalescers: dict[tuple[str, str | None], Coalescer[str, WriteResult]] = {}
        self._inserters: dict[str, Batcher[_Insert, tuple[bool, str | None]]] = {}
        self.endpoints = endpoints or EndpointSet(config, limits)
        self.transaction_share = TransactionShare(config.pool_settings.max_connections)
        self._acquire_timeout = config.pool_settings.timeout_seconds
        self._reconnect_task: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self.endpoints.primary.pool

    @pool.setter
    def pool(self, value: asyncpg.Pool | None) -> None:
        self.endpoints.primary.pool = value

    @property
    def waiting(self) -> int:
        return self.endpoints.primary.waiting

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pools; if the primary is not reachable yet, keep trying in the
        background (requests get 503 database_unavailable meanwhile, health says why)."""
        try:
            await self._open()
        except ProxyError as err:
            log.warning(
                "database %s (%s) not ready: %s; retrying in the background",
                self.name,
                self.config.redacted_dsn(),
                err.message,
            )
            self._reconnect_task = asyncio.create_task(self._reconnect())
        await self.endpoints.start_replicas()
        self.endpoints.start_watchdog()

    async def _open(self) -> None:
        ps = self.config.pool_settings
        pool = None
        try:
            pool = await self.endpoints.open_pool(self.endpoints.primary)
            async with pool.acquire(timeout=ps.timeout_seconds) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbproxy:schema'))")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema_ident}")
                await conn.execute(HELPER_FUNCTIONS.format(schema=self._schema_ident))
                await conn.execute(KEEP_FUNCTION.format(schema=self._schema_ident))
                await conn.execute(AUDIT_DDL.format(schema=self._schema_ident))
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._schema_ident}._idempotency ("
                    "key text PRIMARY KEY, fingerprint text NOT NULL, status int, "
                    "headers jsonb, body bytea, expires_at timestamptz NOT NULL)"
                )
        except Exception as exc:
            if pool is not None:
                pool.terminate()
            err = translate(exc)
            if getattr(exc, "sqlstate", None) == "3D000":
                name = dsn_database(self.config.connection_string)
                what = f"database {name}" if name else "the configured database"
                err = Unavailable(f"{what} does not exist", retry_after=MISSING_RETRY_AFTER)
            self._down(err)
            raise err from None
        self.pool = pool
        self._last_error = None
        self.endpoints.primary.down_reason = None

    def _down(self, err: ProxyError) -> None:
        """Remember why the primary's pool is not open: health and requests say so."""
        self._last_error = err.code
        self.endpoints.primary.down_reason = err.message

    async def _reconnect(self) -> None:
        delay = 0.5
        while self.pool is None:
            await asyncio.sleep(delay)
            before = self.endpoints.primary.down_reason
            try:
                await self._open()
                log.info("database %s is reachable now", self.name)
            except ProxyError as err:
                if err.message != before:  # once per reason, not once per attempt
                    log.warning("database %s not ready: %s", self.name, err.message)
                delay = min(delay * 2, 15.0)

    async def close(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            await asyncio.gather(self._reconnect_task, return_exceptions=True)
            self._reconnect_task = None
        await self.endpoints.close()

    async def health(self) -> dict[str, Any]:
        """Ready when the primary answers; replicas only degrade."""
        started = time.perf_counter()
        if self.pool is None:
            gone: dict[str, Any] = {"status": "down", "error": self._last_error or "not_connected"}
            if self.endpoints.primary.down_reason:
                gone["message"] = self.endpoints.primary.down_reason
            return gone
        try:
            async with self._conn(wait=2.0) as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
        except Exception as exc:
            err = translate(exc)
            return {"status": "down", "error": err.code}
        pool = self.pool
        assert pool is not None
        out: dict[str, Any] = {
            "status": "up",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "pool": {
                "size": pool.get_size(),
                "idle": pool.get_idle_size(),
                "max": pool.get_max_size(),
            },
        }
        if self.endpoints.replicas:
            down = [r.name for r in self.endpoints.replicas if not r.state.healthy]
            out["replicas"] = {"total": len(self.endpoints.replicas), "down": down}
            if down:
                out["degraded"] = True
        return out

    @asynccontextmanager
    async def _conn(self, wait: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A primary connection for housekeeping and monitoring queries (and DDL). One
        that timed out is closed, not returned: waiting for the server to acknowledge the
        cancel would hang on a server that does not answer."""
        pool = self.pool
        if pool is None:
            raise Unavailable(
                self.endpoints.primary.down_reason or "the database pool is not open",
                retry_after=1,
            )
        try:
            conn = await pool.acquire(
                timeout=max(wait, 0.001) if wait is not None else self._acquire_timeout
            )
        except TimeoutError:
            raise PoolExhausted(
                "no database connection became free in time", retry_after=1
            ) from None
        except Exception as exc:
            raise translate(exc) from None
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError):
            conn.terminate()
            raise
        finally:
            await release(pool, conn)  # asyncpg shields the release from cancellation

    def _timeout(self) -> tuple[float, bool]:
        """This statement's client-side timeout (what is left of the request's deadline;
        with the grace when it is the global timeout, so the server's own cancel comes
        first), and whether running into it means the server is unresponsive (a
        per-service cap below the global one is the client's own)."""
        left, hard = budget(self.limits)
        return (left + GRACE_SECONDS if hard else left), hard

    @staticmethod
    def _timed_out(hard: bool, sent: bool, write: bool) -> ProxyError:
        if write and sent:  # an autocommit statement is its own COMMIT
            return CommitOutcomeUnknown(
                "the database did not answer in time; the write may or may not have been applied"
            )
        if hard:
            return _no_answer()
        return Timeout("the statement took longer than the service's statement timeout")

    async def _run_on(
        self, ep: Endpoint, sql: str, args: tuple[Any, ...], write: bool = False
    ) -> list[asyncpg.Record]:
        """One statement on one endpoint, its outcome fed to the endpoint's breaker; every
        wait ends by the request's deadline. A timed-out statement is never retried here
        and its connection is closed (its state is unknown)."""
        eps = self.endpoints
        timeout, hard = self._timeout()
        if timeout <= 0:
            ep.breaker.release()
            raise self._timed_out(hard, False, write)
        conn = await eps.acquire(ep, min(self._acquire_timeout, timeout))
        timeout, hard = self._timeout()
        context.last_statement.set((sql, args))
        ep.statements += 1
        ep.state.outstanding += 1
        started = time.perf_counter()
        lost = False
        try:
            if timeout <= 0:
                eps.record(ep, None)
                raise self._timed_out(hard, False, write)
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=timeout)
        except TimeoutError as exc:
            lost = True
            eps.record(ep, exc if hard else None)
            raise self._timed_out(hard, True, write) from None
        except asyncio.CancelledError:
            lost = True
            ep.breaker.release()
            raise
        except ProxyError:
            raise
        except BaseException as exc:
            eps.record(ep, exc)
            raise
        else:
            eps.record(ep, None, (time.perf_counter() - started) * 1000.0)
            return rows
        finally:
            ep.state.outstanding -= 1
            if ep.pool is not None:
                if lost:  # asyncpg sent a cancel: the release waits for its answer
                    self._release_later(ep.pool, conn)
                else:
                    await release(ep.pool, conn)

    def _release_later(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        """Give back a connection whose statement was cancelled without making the request
        wait: asyncpg waits (at most the acquire timeout, then closes it) for the server to
        acknowledge the cancel, which a server that does not answer never does."""
        task = asyncio.ensure_future(pool.release(conn, timeout=self._acquire_timeout))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # a connection that could not be reset was closed: fine

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run a write on the primary, creating the collection's table on first use; with
        replicas, note the WAL position for the response's consistency token."""
        try:
            if collection not in self._known_tables:
                async with self._conn(self._wait()) as conn:
                    await self._ensure_table(conn, collection)
            ep = self.endpoints.choose("write", None, None)
            try:
                rows = await self._run_on(ep, sql, args, write=True)
            except asyncpg.exceptions.UndefinedTableError:
                self._known_tables.discard(collection)  # dropped behind our back
                async with self._conn(self._wait()) as conn:
                    await self._ensure_table(conn, collection)
                rows = await self._run_on(ep, sql, args, write=True)
            if self.endpoints.replicas:
                await self._note_write_position()
            return rows
        except Exception as exc:
            raise translate(exc) from None

    async def _note_write_position(self) -> None:
        async with self._conn(self._wait()) as conn:
            lsn = await conn.fetchval(
                "SELECT pg_current_wal_lsn()::text", timeout=max(self._wait(), 0.001)
            )
        context.write_token.set(lsn)

    async def _read(
        self, collection: str, sql: str, *args: Any, kind: str = "read"
    ) -> list[asyncpg.Record] | None:
        """Run a read where the router says; None when the collection has no table. A
        connection lost under a read is retried once (reads are idempotent)."""
        ctx = context.current.get()
        try:
            for attempt in (0, 1):
                ep = self.endpoints.choose(kind, ctx.read_preference, ctx.min_lsn)
                try:
                    return await self._run_on(ep, sql, args)
                except asyncpg.exceptions.UndefinedTableError:
                    return None
                except TimeoutError:  # an OSError, but never retried: it may run again
                    raise
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                    if attempt == 1:
                        raise
            raise AssertionError("unreachable")
        except ProxyError:
            raise
        except Exception as exc:
            raise translate(exc) from None

    async def insert_one(self, collection: str, doc: dict[str, Any]) -> WriteResult:
        """Create one document. Concurrent creates of one collection are written by ONE
        statement (and one commit); each is answered only after that commit returned, with
        its own outcome, and each keeps its own audit row."""
        if not self.coalesce:
            return await super().insert_one(collection, doc)
        doc_id, body = self._prepare(doc)
        ctx = context.current.get()
        batcher = self._inserters.get(collection)
        if batcher is None:
            batcher = self._inserters[collection] = Batcher(
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
    ) -> Callable[[list[_Insert]], Awaitable[list[tuple[bool, str | None] | BaseException]]]:
        table = self._table(collection)
        audit = (
            f", a AS (INSERT INTO {self._schema_ident}._audit "
            "(service, operation, collection, ids, request_id) "
            "SELECT u.svc, 'create', $5, ARRAY[u.i], u.rid FROM u JOIN w ON w._id = u.i)"
            if self.audit
            else ""
        )
        sql = (
            "WITH u AS (SELECT * FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::text[]) "
            f"AS u(i, d, svc, rid)), w AS (INSERT INTO {table} (_id, doc, _version) "
            "SELECT u.i, u.d, 1 FROM u ON CONFLICT (_id) DO NOTHING RETURNING _id)"
            f"{audit} SELECT _id FROM w"
        )

        async def run(items: list[_Insert]) -> list[tuple[bool, str | None] | BaseException]:
            columns = [list(c) for c in zip(*items, strict=True)]
            args = (*columns, collection) if self.audit else tuple(columns)
            try:
                rows = await self._write(collection, sql, *args)
            except InvalidQuery:
                # one bad document (a value the database refuses) must not fail the others
                return [await self._insert_alone(collection, item) for item in items]
            token = context.write_token.get()
            inserted = {r[0] for r in rows}
            return [(item[0] in inserted, token) for item in items]

        return run

    async def _insert_alone(
        self, collection: str, item: _Insert
    ) -> tuple[bool, str | None] | BaseException:
        doc_id, body, svc, rid = item
        token = context.current.set(RequestContext(svc, rid))
        try:
            params = Params([doc_id, body])
            sql = self._audited(
                f"INSERT INTO {self._table(collection)} (_id, doc, _version) VALUES "
                "($1, $2::jsonb, 1) ON CONFLICT (_id) DO NOTHING RETURNING _id AS audit_id",
                params,
                "create",
                collection,
            )
            rows = await self._write(collection, sql, *params.values)
            return bool(rows), context.write_token.get()
        except ProxyError as err:
            return err
        finally:
            context.current.reset(token)

    async def get(self, collection: str, doc_id: str) -> WriteResult | None:
        """By id; concurrent point reads of one collection share one query (coalescing),
        except reads bound to a consistency token, which are routed one by one."""
        ctx = context.current.get()
        if not self.coalesce or ctx.min_lsn is not None:
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

    def coalescing(self) -> dict[str, int]:
        return {
            "batches": sum(c.batches for c in self._coalescers.values()),
            "reads": sum(c.keys for c in self._coalescers.values()),
        }

    def connections(self) -> dict[str, Any]:
        """Per endpoint: role, pool figures, breaker, lag, last error (never secrets)."""
        endpoints = self.endpoints.snapshot()
        if self._last_error and endpoints:
            endpoints[0]["last_error"] = endpoints[0]["last_error"] or self._last_error
        return {
            "type": "postgresql",
            "dsn": self.config.redacted_dsn(),
            "read_preference": self.config.read_preference,
            "endpoints": endpoints,
        }

    async def describe_collections(self) -> dict[str, Any]:
        """Row estimates, table/index sizes and dead tuples of every collection table."""
        sql = (
            "SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid), "
            "pg_indexes_size(c.oid), coalesce(s.n_dead_tup, 0), coalesce(s.n_live_tup, 0) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
            "WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname !~ '^_' ORDER BY c.relname"
        )
        async with self._conn() as conn:
            try:
                rows = await conn.fetch(sql, self.schema)
            except Exception as exc:
                raise translate(exc) from None
        return {
            r[0]: {
                "rows_estimate": max(int(r[1]), int(r[5])),
                "table_bytes": int(r[2]),
                "index_bytes": int(r[3]),
                "dead_tuples": int(r[4]),
            }
            for r in rows
        }

    async def explain(self, sql: str, args: tuple[Any, ...]) -> tuple[bool, str]:
        """The plan of a statement (EXPLAIN without ANALYZE): whether an index is used, and a
        one-line summary."""
        async with self._conn() as conn:
            try:
                raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args, timeout=2.0)
            except Exception as exc:
                raise translate(exc) from None
        plan = (orjson.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        nodes = []
        stack = [plan]
        while stack:
            node = stack.pop()
            nodes.append(node.get("Node Type", "?"))
            stack.extend(node.get("Plans", []))
        index_used = any("Index" in n for n in nodes)
        summary = f"{plan.get('Node Type')} (cost {plan.get('Total Cost')}): " + " > ".join(nodes)
        return index_used, summary[:500]

    async def audit_log(
        self,
        *,
        scope: AuditScope | None = None,
        service: str | None = None,
        collection: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Audit records, oldest first, filtered; times are Unix seconds."""
        sql = (
            "SELECT id, extract(epoch FROM at)::float8 AS at, service, operation, collection, "
            f"ids, request_id, outcome FROM {self._schema_ident}._audit "
            "WHERE ($1::text IS NULL OR service = $1) AND ($2::text IS NULL OR collection = $2) "
            "AND ($3::float8 IS NULL OR at >= to_timestamp($3)) "
            "AND ($4::float8 IS NULL OR at < to_timestamp($4)) "
            "AND ($5::bigint IS NULL OR id > $5) "
            "AND ($7::bool OR collection = ANY($8::text[]) "
            'OR collection COLLATE "C" ~ ANY($9::text[]) '
            "OR (collection = '*' AND service = $10)) "
            "ORDER BY id LIMIT $6"
        )
        s = scope or AuditScope((), (), "")
        regexes = [_glob_to_posix(g) for g in s.globs]
        args = (service, collection, since, until, after_id, limit, scope is None, s.names)
        async with self._conn() as conn:
            try:
                rows = await conn.fetch(sql, *args, regexes, s.service)
            except Exception as exc:
                raise translate(exc) from None
        return [dict(r) for r in rows]

    async def maintain(self) -> None:
        """Periodic housekeeping: forget expired idempotency keys."""
        async with self._conn() as conn:
            await conn.execute(
                f"DELETE FROM {self._schema_ident}._idempotency WHERE expires_at < now()"
            )

    # -- transactions ------------------------------------------------------------------

    async def begin(
        self, isolation: str = "read_committed", kind: TxKind = TxKind.SINGLE
    ) -> PostgresTransaction:
        """Pin a pooled connection and open a transaction on it; batches and interactive
        transactions only within the pool's transaction share."""
        if isolation not in ISOLATION_LEVELS:
            raise BadRequest(
                f"isolation must be one of {', '.join(ISOLATION_LEVELS)}", code="invalid_isolation"
            )
        ep = self.endpoints.choose("transaction", None, None)
        wait = self._wait()
        if wait <= 0:
            ep.breaker.release()
            raise _no_answer()
        share = self.transaction_share
        try:
            shared = await share.take(kind, min(self._acquire_timeout, wait))
        except BaseException:
            ep.breaker.release()
            raise
        try:
            conn = await self.endpoints.acquire(ep, min(self._acquire_timeout, self._wait()))
        except BaseException as exc:
            if shared:
                share.give()
            if isinstance(exc, Exception) and not isinstance(exc, ProxyError):
                raise translate(exc) from None
            raise
        pool = ep.pool
        assert pool is not None
        self.endpoints.record(ep, None)
        give = share.give if shared else None
        cap = context.current.get().statement_timeout
        try:
            tx = conn.transaction(isolation=isolation)
            async with asyncio.timeout(max(self._wait(), 0.001)):
                await tx.start()
                if cap is not None and cap < self.limits.statement_timeout_seconds:
                    # the service's own statement timeout, enforced by the server for
                    # every statement of this transaction (batch or interactive)
                    await conn.execute(
                        "SELECT set_config('statement_timeout', $1, true)",
                        str(max(1, int(cap * 1000))),
                    )
        except BaseException as exc:
            if isinstance(exc, TimeoutError | asyncio.CancelledError):
                conn.terminate()
            await release(pool, conn)
            if give is not None:
                give()
            if isinstance(exc, Exception):
                raise translate(exc) from None
            raise
        return PostgresTransaction(self, pool, conn, tx, isolation, give, ep, kind)


ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")


class PostgresTransaction(_Documents):
    """The document operations on one pinned connection inside an open transaction.

    A statement error aborts the whole transaction (PostgreSQL's rule): the transaction is
    then marked failed and only ``rollback`` remains. ``commit``/``rollback`` always give
    the connection back to the pool, rolled back and clean."""

    def __init__(
        self,
        backend: PostgresBackend,
        pool: asyncpg.Pool,
        conn: asyncpg.Connection,
        tx: Any,
        isolation: str,
        give_share: Callable[[], None] | None = None,
        ep: Endpoint | None = None,
        kind: TxKind = TxKind.INTERACTIVE,
    ) -> None:
        super().__init__(
            backend.name,
            backend.limits,
            backend.schema,
            backend.ids,
            set(backend._known_tables),
            backend.audit,
        )
        self.wrote = False
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._tx = tx
        self._ep = ep
        self._kind = kind
        self.isolation = isolation
        self.failed: ProxyError | None = None
        self.closed = False
        self._give_share = give_share

    def backend_pid(self) -> int:
        return int(self._conn.get_server_pid())

    def _check_usable(self) -> None:
        if self.closed:
            raise Conflict("the transaction has already ended", code="transaction_closed")
        if self.failed is not None:
            raise Conflict(
                "an earlier statement failed; the transaction can only be rolled back",
                code="transaction_aborted",
            )

    def _fail(self, exc: BaseException) -> ProxyError:
        err = translate(exc)
        if isinstance(exc, TimeoutError):  # no answer: the connection's state is unknown
            self._conn.terminate()  # the server rolls the transaction back on its own
            err = DatabaseTimeout(
                "the database did not answer within the request's deadline; the "
                "transaction was rolled back"
            )
        elif isinstance(exc, _CONNECTION_ERRORS) and self._kind is TxKind.INTERACTIVE:
            err = Conflict(
                "the transaction's database connection was lost; it was rolled back",
                code="transaction_aborted",
            )
        elif isinstance(exc, _CONNECTION_ERRORS):  # a batch or one write: retry it whole
            err = Unavailable(
                "the database connection was lost before COMMIT; nothing was written",
                retry_after=1,
            )
        self.failed = err
        return err

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One statement on the pinned connection, ending by the request's deadline (the
        service's statement timeout is the server's, set at begin)."""
        timeout = self._wait()
        if timeout <= 0:
            raise TimeoutError
        ep = self._ep
        if ep is None:
            rows: list[asyncpg.Record] = await self._conn.fetch(sql, *args, timeout=timeout)
            return rows
        ep.state.outstanding += 1  # seen by the watchdog: a frozen server is found
        try:
            rows = await self._conn.fetch(sql, *args, timeout=timeout)
        finally:
            ep.state.outstanding -= 1
        ep.last_answer = time.monotonic()
        return rows

    async def _write(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        self._check_usable()
        self.wrote = True
        try:
            await self._ensure_table(self._conn, collection)
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def _read(self, collection: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        self._check_usable()
        try:
            if collection not in self._known_tables:
                found = await self._fetch(
                    "SELECT to_regclass($1) IS NOT NULL", self._table(collection)
                )
                if not found[0][0]:
                    return None
                self._known_tables.add(collection)
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None:
        """Claim an idempotency key in this transaction, or return the reply stored for it.

        A concurrent request with the same key waits on the row lock until the first one
        commits (then its reply is returned here) or rolls back (then this one claims it)."""
        table = f"{self._schema_ident}._idempotency"
        claimed = await self._run(
            f"INSERT INTO {table} AS t (key, fingerprint, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) ON CONFLICT (key) DO UPDATE "
            "SET fingerprint = EXCLUDED.fingerprint, status = NULL, headers = NULL, "
            "body = NULL, expires_at = EXCLUDED.expires_at WHERE t.expires_at < now() "
            "RETURNING 1",
            key,
            fingerprint,
            ttl,
        )
        if claimed:
            return None
        rows = await self._run(
            f"SELECT fingerprint, status, headers::text, body FROM {table} WHERE key = $1", key
        )
        fp, status, headers, body = rows[0]
        check_fingerprint(fp, fingerprint)
        return StoredReply(int(status), bytes(body), orjson.loads(headers))

    async def idem_save(self, key: str, reply: StoredReply) -> None:
        await self._run(
            f"UPDATE {self._schema_ident}._idempotency SET status = $2, "
            "headers = $3::jsonb, body = $4 WHERE key = $1",
            key,
            reply.status,
            orjson.dumps(reply.headers).decode(),
            reply.body,
        )

    async def _run(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self._check_usable()
        try:
            return await self._fetch(sql, *args)
        except Exception as exc:
            raise self._fail(exc) from None

    async def commit(self) -> None:
        """COMMIT; a connection lost while COMMIT was in flight is reported as unknown.

        Shielded: a client that goes away mid-commit cannot leave the connection half-done.
        """
        self._check_usable()
        if self.audit and self.wrote:
            ctx = context.current.get()
            await self._run(
                f"INSERT INTO {self._schema_ident}._audit "
                "(service, operation, collection, ids, request_id) "
                "VALUES ($1, 'transaction_commit', '*', '{}', $2)",
                ctx.service,
                ctx.request_id,
            )
        self.closed = True
        await asyncio.shield(self._commit_and_release())
        self._backend._known_tables.update(self._known_tables)

    async def _commit_and_release(self) -> None:
        try:
            async with asyncio.timeout(max(self._wait(), GRACE_SECONDS)):
                await self._tx.commit()
        except TimeoutError:  # COMMIT was sent and never answered
            self._conn.terminate()
            raise CommitOutcomeUnknown(
                "the database did not answer the COMMIT in time; the transaction may or may "
                "not have been applied"
            ) from None
        except _CONNECTION_ERRORS:
            raise CommitOutcomeUnknown(
                "the connection was lost while committing; the transaction may or may not "
                "have been applied"
            ) from None
        except Exception as exc:
            await self._rollback_quietly()
            raise translate(exc) from None
        finally:
            await self._release()

    async def rollback(self) -> None:
        """ROLLBACK and give the connection back; idempotent, shielded from cancellation."""
        if self.closed:
            return
        self.closed = True
        await asyncio.shield(self._rollback_and_release())

    async def _rollback_and_release(self) -> None:
        try:
            await self._rollback_quietly()
        finally:
            await self._release()

    async def _release(self) -> None:
        give, self._give_share = self._give_share, None
        try:
            await release(self._pool, self._conn)  # rolled back or closed: never unclean
        finally:
            if give is not None:
                give()

    async def _rollback_quietly(self) -> None:
        try:
            if not self._conn.is_closed() and self._conn.is_in_transaction():
                async with asyncio.timeout(GRACE_SECONDS):  # else the server rolls back
                    await self._tx.rollback()
        except Exception:  # the connection is gone: the server rolls back on its own
            with contextlib.suppress(Exception):
                self._conn.terminate()
