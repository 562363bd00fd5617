"""Migrations on PostgreSQL: the ``_migrations`` records, the session advisory lock, index
DDL on the query compiler's expressions, and a migration's transactions."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Protocol

import asyncpg
import orjson

import proxy.backends.postgres.partman as partman
from proxy.backends.migrations import Batch, declared_index_name, physical_index_name
from proxy.backends.postgres.convert import PgConvert
from proxy.backends.postgres.errors import translate
from proxy.backends.postgres.partitions import PartKey, name_child_indexes
from proxy.backends.postgres.sql import INDEX_DDL, SCHEMAS_CHANNEL, TABLE_DDL, with_audit
from proxy.config import DatabaseConfig
from proxy.errors import BadRequest, Conflict, DuplicateKey, ProxyError
from proxy.query.ast import Filter, Update
from proxy.query.pg import FilterCompiler, Params, UpdateCompiler, declared_expr
from proxy.query.pg_typed import declared_order
from proxy.query.search_pg import SEARCH_COLUMN, column_ddl
from proxy.schema.model import IndexSpec, SearchDeclaration
from proxy.schema.partitioning import Partitioning


class PgHost(Protocol):
    """What the migrations use of the PostgreSQL backend that owns them."""

    config: DatabaseConfig
    schema: str
    audit: bool
    partman: bool  # time partitions left to pg_partman when the database has it
    _schema_ident: str

    def _conn(
        self, wait: float | None = None
    ) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    def _table(self, collection: str) -> str: ...


LOCK_CLASS: Final = 0x64627078  # 'dbpx': the advisory lock's first key; the second: the schema
MIGRATIONS_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS {schema}._migrations ("
    'id text COLLATE "C" PRIMARY KEY, version bigint NOT NULL, status text NOT NULL, '
    "checksum text NOT NULL, record jsonb NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())"
)
_SAVE: Final = (
    "INSERT INTO {schema}._migrations (id, version, status, checksum, record) "
    "VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (id) DO UPDATE SET "
    "version = excluded.version, status = excluded.status, checksum = excluded.checksum, "
    "record = excluded.record, updated_at = now()"
)
_INSERT: Final = (
    "INSERT INTO {schema}._migrations (id, version, status, checksum, record) "
    "VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (id) DO NOTHING"
)
_HOLDER: Final = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid "
    "AND l.objid = (hashtext($2) & 2147483647)::oid AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_APP_PREFIX: Final = "dbproxy-migrate "
_PLACEHOLDER: Final = re.compile(r"\$(\d+)::([a-z0-9_]+(?:\[\])?)")


def key_expr(path: tuple[str, ...], kind: str | None, doc: str = "doc") -> str:
    """An index key's expression: the declared one for a declared scalar path, else the
    jsonb at the path (missing as JSON null, so missing and null are one value)."""
    if kind is not None:
        return declared_expr(path, kind, doc)
    steps = "".join(f" -> '{seg}'" for seg in path)
    return f"COALESCE({doc}{steps}, 'null'::jsonb)"


def index_ddl(
    table: str,
    physical: str,
    index: IndexSpec,
    kinds: dict[tuple[str, ...], str],
    *,
    concurrently: bool = False,
    predicate: str | None = None,
    pkey: tuple[str, ...] | None = None,
) -> str:
    keys = []
    for key in index.keys:
        kind = kinds.get(key.path)
        if key.path == pkey:  # a partitioned table's unique index holds the key column
            keys.append(f"_pkey{' DESC' if key.descending else ''}")
            continue
        if kind is not None:  # the compiler's ORDER BY item, so the planner matches the column
            keys.append(declared_order(key.path, kind, key.descending, doc="doc"))
            continue
        order = "DESC NULLS LAST" if key.descending else ""
        keys.append(f"({key_expr(key.path, kind)}) {order}".rstrip())
    return (
        f"CREATE {'UNIQUE ' if index.unique else ''}INDEX {'CONCURRENTLY ' if concurrently else ''}"
        f'IF NOT EXISTS "{physical}" ON {table} ({", ".join(keys)})'
        f"{' NULLS NOT DISTINCT' if index.unique else ''}"
        f"{f' WHERE {predicate}' if predicate else ''}"
    )


def _duplicate(exc: BaseException, fallback: str) -> DuplicateKey:
    name = declared_index_name(getattr(exc, "constraint_name", None)) or fallback
    return DuplicateKey(
        f"the unique index {name!r} refuses duplicate values", details={"index": name}
    )


class PgMigrations:
    """The migration side of one PostgreSQL backend (its schema, its primary)."""

    dialect = "postgresql"

    def __init__(self, backend: PgHost) -> None:
        self.backend = backend
        self.schema = backend.schema
        self.ident = backend._schema_ident

    @property
    def dsn(self) -> str:
        """The backend's connection string as it is now (a rotated secret included)."""
        return self.backend.config.connection_string

    def table(self, collection: str) -> str:
        return self.backend._table(collection)

    async def prepare(self) -> None:
        async with self.backend._conn() as conn:
            try:
                async with conn.transaction():  # concurrent CREATE TABLEs would collide
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbproxy:schema'))")
                    await conn.execute(MIGRATIONS_DDL.format(schema=self.ident))
            except Exception as exc:
                raise translate(exc) from None

    async def lock_holder(self) -> str | None:
        async with self.backend._conn() as conn:
            name = await conn.fetchval(_HOLDER, LOCK_CLASS, self.schema)
        if name is None:
            return None
        return str(name).removeprefix(_APP_PREFIX) or "unknown"

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self.backend._conn() as conn:
            try:
                return list(await conn.fetch(sql.format(schema=self.ident), *args))
            except asyncpg.UndefinedTableError:
                return []
            except Exception as exc:
                raise translate(exc) from None

    async def record(self, mig_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            "SELECT record::text FROM {schema}._migrations WHERE id = $1", mig_id
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def create(self, record: dict[str, Any]) -> None:
        async with self.backend._conn() as conn:
            try:
                await conn.execute(_INSERT.format(schema=self.ident), *_record_args(record))
            except Exception as exc:
                raise translate(exc) from None

    async def records(self) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT record::text FROM {schema}._migrations ORDER BY id")
        return [orjson.loads(r[0]) for r in rows]

    def index_sql(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> str:
        predicate = None
        if index.partial_filter is not None:
            predicate = FilterCompiler(Params()).where(_partial(index), "doc")
        return index_ddl(
            self.table(collection),
            physical_index_name(collection, index.name),
            index,
            kinds,
            predicate=predicate,
        )

    @asynccontextmanager
    async def session(self, runner: str, *, lock: bool = True) -> AsyncIterator[PgSession]:
        """A connection of its own holding the session advisory lock (waits for it)."""
        try:
            conn = await asyncpg.connect(
                self.dsn,
                server_settings={
                    "application_name": (_APP_PREFIX + runner)[:63],
                    "statement_timeout": "0",
                },
            )
        except Exception as exc:
            raise translate(exc) from None
        try:
            if lock:
                await _take_lock(conn, self.schema)
            yield PgSession(self, conn)
        finally:
            await conn.close()  # frees the session lock


async def _take_lock(conn: asyncpg.Connection, schema: str) -> None:
    """The session advisory lock of ``schema``'s migrations, polled (so a cancelled wait
    leaves nothing queued on the server)."""
    while True:
        if await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2) & 2147483647)", LOCK_CLASS, schema
        ):
            return
        await asyncio.sleep(0.1)


def _partial(index: IndexSpec) -> Filter:
    from proxy.config import Limits
    from proxy.query.parse import parse_filter

    return parse_filter(index.partial_filter, Limits())


class PgSession:
    """A runner's connection (holding the lock)."""

    def __init__(self, store: PgMigrations, conn: asyncpg.Connection) -> None:
        self.store = store
        self.conn = conn

    async def save(self, record: dict[str, Any]) -> None:
        await _save(self.conn, self.store.ident, record)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgTx]:
        try:
            async with self.conn.transaction():
                yield PgTx(self.store, self.conn)
        except ProxyError:
            raise
        except asyncpg.UniqueViolationError as exc:
            raise _duplicate(exc, "?") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise translate(exc) from None

    async def count(self, collection: str, flt: Filter | None) -> int:
        params = Params()
        where = FilterCompiler(params).where(flt, "t.doc") if flt is not None else "true"
        sql = f"SELECT count(*) FROM {self.store.table(collection)} t WHERE {where}"
        try:
            async with self.conn.transaction():  # a savepoint inside a plan's transaction
                return int(await self.conn.fetchval(sql, *params.values))
        except asyncpg.UndefinedTableError:
            return 0
        except Exception as exc:
            raise translate(exc) from None

    async def build_index_online(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> bool:
        """CREATE INDEX CONCURRENTLY on a non-empty table, then checked valid."""
        table = self.store.table(collection)
        conn = self.conn
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", table
        )
        if kind == "p":  # no CONCURRENTLY on a partitioned table: built in a transaction
            return False
        try:
            if not await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                return False
        except asyncpg.UndefinedTableError:
            return False
        physical = physical_index_name(collection, index.name)
        valid = await self._valid(physical)
        if valid:
            return True  # built by an earlier, interrupted run
        if valid is False:
            await self._drop_concurrently(physical)
        predicate = await _predicate(conn, index)
        ddl = index_ddl(table, physical, index, kinds, concurrently=True, predicate=predicate)
        try:
            await conn.execute(ddl)
        except Exception as exc:
            await self._drop_concurrently(physical)
            if isinstance(exc, asyncpg.UniqueViolationError):
                raise _duplicate(exc, index.name) from None
            raise _index_error(exc, index) from None
        if not await self._valid(physical):
            await self._drop_concurrently(physical)
            raise Conflict(
                f"index {index.name!r} was left invalid by the database and was dropped",
                code="index_invalid",
                details={"index": index.name},
            )
        return True

    async def _valid(self, physical: str) -> bool | None:
        return await self.conn.fetchval(  # type: ignore[no-any-return]
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            self.store.schema,
            physical,
        )

    async def _drop_concurrently(self, physical: str) -> None:
        await self.conn.execute(
            f'DROP INDEX CONCURRENTLY IF EXISTS {self.store.ident}."{physical}"'
        )


def _record_args(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["id"],
        record.get("version", 0),
        record["status"],
        record["checksum"],
        orjson.dumps(record).decode(),
    )


async def _save(conn: asyncpg.Connection, ident: str, record: dict[str, Any]) -> None:
    await conn.execute(_SAVE.format(schema=ident), *_record_args(record))


async def _predicate(conn: asyncpg.Connection, index: IndexSpec) -> str | None:
    """The partial filter as SQL with every value inlined as a literal the server itself
    quoted (``quote_literal``): DDL takes no bound parameters."""
    if index.partial_filter is None:
        return None
    params = Params()
    sql = FilterCompiler(params).where(_partial(index), "doc")
    literals: dict[int, str] = {}
    for m in _PLACEHOLDER.finditer(sql):
        n, cast = int(m.group(1)), m.group(2)
        if n not in literals:
            value = params.values[n - 1]
            literals[n] = await conn.fetchval(f"SELECT quote_literal(($1::{cast})::text)", value)
    return _PLACEHOLDER.sub(lambda m: f"{literals[int(m.group(1))]}::{m.group(2)}", sql)


def _index_error(exc: BaseException, index: IndexSpec) -> ProxyError:
    state = getattr(exc, "sqlstate", "") or ""
    if index.partial_filter is not None and state in ("42P17", "0A000", "42804", "42883"):
        return BadRequest(
            f"index {index.name!r}: this partial_filter cannot be an index predicate "
            "(only plain comparisons can)",
            code="unsupported",
            details={"index": index.name, "feature": "partial_filter"},
        )
    return translate(exc)


class PgTx(PgConvert):
    """One transaction of a migration on the runner's connection."""

    def table(self, collection: str) -> str:
        return self.store.table(collection)

    def partman_parent(self, collection: str) -> str | None:
        host = self.store.backend
        if not host.partman or "." in host.schema:  # pg_partman splits its names at dots
            return None
        return f"{host.schema}.{collection}"

    def __init__(self, store: PgMigrations, conn: asyncpg.Connection) -> None:
        self.store = store
        self.conn = conn
        self.ident = store.ident
        self._made: dict[str, Partitioning] = {}  # partitioned here, schema not saved yet

    async def stored_schema(self, collection: str) -> tuple[int, dict[str, Any]] | None:
        row = await self.conn.fetchrow(
            f"SELECT version, schema::text FROM {self.ident}._schemas WHERE collection = $1",
            collection,
        )
        return None if row is None else (int(row[0]), orjson.loads(row[1]))

    async def write_schema(self, collection: str, schema: dict[str, Any] | None) -> None:
        if schema is None:
            await self.conn.execute(
                f"DELETE FROM {self.ident}._schemas WHERE collection = $1", collection
            )
        else:
            await self.conn.execute(
                f"INSERT INTO {self.ident}._schemas AS s (collection, schema) "
                "VALUES ($1, $2::jsonb) ON CONFLICT (collection) DO UPDATE SET "
                "schema = excluded.schema, version = s.version + 1, updated_at = now()",
                collection,
                orjson.dumps(schema).decode(),
            )
        await self.conn.execute("SELECT pg_notify($1, $2)", SCHEMAS_CHANNEL, collection)

    async def table_exists(self, collection: str) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", self.store.table(collection)
            )
        )

    async def needs_online(self, collection: str) -> bool:
        if not await self.table_exists(collection) or await self.partitioning(collection):
            return False  # no CONCURRENTLY on a partitioned table: built in the transaction
        table = self.store.table(collection)
        return bool(await self.conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"))

    async def create_collection(self, collection: str) -> None:
        import hashlib

        table = self.store.table(collection)
        gin = "gin_" + hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"dbproxy:{collection}"
        )
        await self.conn.execute(TABLE_DDL.format(table=table))
        await self.conn.execute(INDEX_DDL.format(index=gin, table=table))

    async def finish_partitioning(
        self,
        collection: str,
        spec: Partitioning,
        indexes: tuple[IndexSpec, ...],
        kinds: dict[tuple[str, ...], str],
    ) -> None:
        ddl = []
        for index in indexes:
            physical = physical_index_name(collection, index.name)
            predicate = await _predicate(self.conn, index)
            ddl.append(
                index_ddl(
                    self.table(collection),
                    physical,
                    index,
                    kinds,
                    predicate=predicate,
                    pkey=spec.key,
                )
            )
        await self._swap(collection, ddl)

    async def drop_collection(self, collection: str) -> None:
        await self.conn.execute(f"DROP TABLE IF EXISTS {self.store.table(collection)}")
        await partman.unregister(self.conn, f"{self.store.schema}.{collection}")
        await self.conn.execute(f"DELETE FROM {self.ident}._ids WHERE collection = $1", collection)

    async def set_search(self, collection: str, declared: SearchDeclaration | None) -> None:
        """The stored ``tsvector`` column (generated: PostgreSQL computes it in the
        statement of every write) and its GIN index, replaced whole; adding the column
        rewrites the table under this transaction's lock."""
        import hashlib

        if not await self.table_exists(collection):
            await self.create_collection(collection)
        table = self.store.table(collection)
        await self.conn.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {SEARCH_COLUMN}")
        if declared is None:
            return
        index = "fts_" + hashlib.blake2s(collection.encode(), digest_size=8).hexdigest()
        for ddl in column_ddl(table, index, declared):
            await self.conn.execute(ddl)

    async def create_index(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> None:
        if not await self.table_exists(collection):
            await self.create_collection(collection)
        physical = physical_index_name(collection, index.name)
        predicate = await _predicate(self.conn, index)
        spec = await self.partitioning(collection)
        ddl = index_ddl(
            self.store.table(collection),
            physical,
            index,
            kinds,
            predicate=predicate,
            pkey=spec.key if spec else None,
        )
        try:
            async with self.conn.transaction():  # a savepoint: the error is ours to name
                await self.conn.execute(ddl)
                if spec is not None:
                    await name_child_indexes(self.conn, self.ident, self.store.table(collection))
        except asyncpg.UniqueViolationError as exc:
            raise _duplicate(exc, index.name) from None
        except asyncpg.PostgresError as exc:
            raise _index_error(exc, index) from None

    async def drop_index(self, collection: str, name: str) -> None:
        physical = physical_index_name(collection, name)
        await self.conn.execute(f'DROP INDEX IF EXISTS {self.ident}."{physical}"')

    async def sql(self, text: str) -> None:
        try:
            async with self.conn.transaction():
                await self.conn.execute(text)
        except asyncpg.PostgresError as exc:
            raise BadRequest(
                f"the sql operation failed: {type(exc).__name__} (sqlstate {exc.sqlstate})",
                code="sql_failed",
                details={"sqlstate": exc.sqlstate},
            ) from None

    async def scan(
        self, collection: str, after: str, size: int
    ) -> list[tuple[str, dict[str, Any]]]:
        try:
            async with self.conn.transaction():  # a savepoint: a missing table is no error
                rows = await self.conn.fetch(
                    f"SELECT _id, doc::text FROM {self.store.table(collection)} "
                    "WHERE _id > $1 ORDER BY _id LIMIT $2",
                    after,
                    size,
                )
        except asyncpg.UndefinedTableError:
            return []
        return [(r[0], orjson.loads(r[1])) for r in rows]

    async def apply_batch(
        self, collection: str, flt: Filter, update: Update, after: str, size: int, audit: str
    ) -> Batch:
        table = self.store.table(collection)
        params = Params()
        a = params.add(after, "text")
        n = params.add(size, "bigint")
        where = FilterCompiler(params).where(flt, "s.doc")
        new = UpdateCompiler(params, self.ident).document_expr(update, "t.doc")
        spec = await self.partitioning(collection)
        moved = f", _pkey = {PartKey(spec, self.ident).of(new)}" if spec else ""
        sql = (
            f"UPDATE {table} AS t SET doc = {new} || jsonb_build_object('_id', t._id, "
            f"'_version', t._version + 1), _version = t._version + 1, updated_at = now(){moved} "
            f"FROM (SELECT s._id FROM {table} s WHERE s._id > {a} AND {where} "
            f"ORDER BY s._id LIMIT {n} FOR UPDATE) b WHERE t._id = b._id "
            "RETURNING t.doc::text AS d, t._id AS audit_id"
        )
        if self.store.backend.audit:
            svc = params.add("dbproxy-migrate", "text")
            op = params.add("backfill", "text")
            coll = params.add(collection, "text")
            rid = params.add(audit, "text")
            sql = with_audit(sql, self.ident, svc, op, coll, rid)
        try:
            async with self.conn.transaction():
                rows = await self.conn.fetch(sql, *params.values)
        except asyncpg.UndefinedTableError:
            return Batch([], [])
        except asyncpg.PostgresError as exc:
            raise translate(exc) from None
        rows = sorted(rows, key=lambda r: r["audit_id"])
        return Batch([r["audit_id"] for r in rows], [orjson.loads(r["d"]) for r in rows])

    async def save(self, record: dict[str, Any]) -> None:
        await _save(self.conn, self.ident, record)


def runner_name() -> str:
    import os

    return f"{socket.gethostname()}:{os.getpid()}"
