"""Migrations on the SQLite store: the ``_migrations`` records, an OS file lock beside the
store, index DDL on the query compiler's expressions, and a migration's transactions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, TypeVar

import orjson

from proxy.backends.migrations import Batch, declared_index_name, physical_index_name
from proxy.backends.sqlite.connection import ConnState, Job, connect
from proxy.backends.sqlite.ddl import AUDIT_INSERT, NOW, create_table, table_name
from proxy.backends.sqlite.errors import no_table, translate
from proxy.backends.sqlite.search import drop_ddl, search_ddl
from proxy.config import DatabaseConfig
from proxy.errors import BadRequest, DuplicateKey, ProxyError
from proxy.query.ast import Filter, Update
from proxy.query.sqlite import FilterCompiler, Names, Params, UpdateCompiler
from proxy.query.sqlite.values import declared_expr, key_path
from proxy.schema.model import IndexSpec, SearchDeclaration
from proxy.schema.partitioning import Partitioning


class SqliteHost(Protocol):
    """What the migrations use of the SQLite backend that owns them."""

    config: DatabaseConfig
    path: str
    audit: bool
    _busy_ms: int

    async def _write(self, collection: str | None, fn: Job[T]) -> T: ...

    async def _read(self, fn: Job[T]) -> T: ...

    async def borrow_writer(self, interactive: bool) -> threading.Event: ...


T = TypeVar("T")
MIGRATIONS_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS _migrations (id TEXT PRIMARY KEY NOT NULL, "
    "version INTEGER NOT NULL, status TEXT NOT NULL, checksum TEXT NOT NULL, "
    f"record TEXT NOT NULL, updated_at TEXT NOT NULL DEFAULT ({NOW}))"
)
_SAVE: Final = (
    "INSERT INTO _migrations (id, version, status, checksum, record) VALUES (?1, ?2, ?3, ?4, ?5) "
    "ON CONFLICT (id) DO UPDATE SET version = excluded.version, status = excluded.status, "
    f"checksum = excluded.checksum, record = excluded.record, updated_at = {NOW}"
)
_PLACEHOLDER: Final = re.compile(r"\?(\d+)(?!\d)")
_TIMEOUT: Final = 24 * 3600.0  # a migration's statements are not cut short


def key_expr(path: tuple[str, ...], kind: str | None, unique: bool, doc: str = "doc") -> str:
    """An index key's expression (``declared_expr``, the same text for any kind). A unique
    key maps missing and null to one value, the empty blob (no JSON value is a blob)."""
    expr = declared_expr(path, kind, doc) if kind else f"json_extract({doc}, '{key_path(path)}')"
    return f"ifnull({expr}, x'')" if unique else expr


def index_ddl(
    collection: str,
    index: IndexSpec,
    kinds: dict[tuple[str, ...], str],
    predicate: str | None = None,
) -> str:
    keys = [
        f"{key_expr(k.path, kinds.get(k.path), index.unique)}{' DESC' if k.descending else ''}"
        for k in index.keys
    ]
    physical = physical_index_name(collection, index.name)
    return (
        f'CREATE {"UNIQUE " if index.unique else ""}INDEX IF NOT EXISTS "{physical}" '
        f"ON {table_name(collection)} ({', '.join(keys)})"
        f"{f' WHERE {predicate}' if predicate else ''}"
    )


def _partial(index: IndexSpec) -> Filter:
    from proxy.config import Limits
    from proxy.query.parse import parse_filter

    return parse_filter(index.partial_filter, Limits())


def _predicate(conn: sqlite3.Connection, index: IndexSpec) -> str | None:
    """The partial filter with every value inlined as a literal SQLite itself quoted
    (``quote()``): DDL takes no bound parameters."""
    if index.partial_filter is None:
        return None
    params = Params()
    sql = FilterCompiler(params, Names()).where(_partial(index), "doc")
    literals = [conn.execute("SELECT quote(?)", (v,)).fetchone()[0] for v in params.values]
    return _PLACEHOLDER.sub(lambda m: str(literals[int(m.group(1)) - 1]), sql)


def _duplicate(exc: BaseException, fallback: str) -> DuplicateKey:
    found = re.search(r"index '([A-Za-z0-9_]+)'", str(exc))
    name = (declared_index_name(found.group(1)) if found else None) or fallback
    return DuplicateKey(
        f"the unique index {name!r} refuses duplicate values", details={"index": name}
    )


class SqliteMigrations:
    """The migration side of one SQLite store."""

    dialect = "sqlite"

    def __init__(self, backend: SqliteHost) -> None:
        self.backend = backend
        self.dsn = backend.config.connection_string
        self.path = backend.path
        self.lock_path = backend.path + ".migrations.lock"

    async def prepare(self) -> None:
        await self.backend._write(None, lambda conn: conn.execute(MIGRATIONS_DDL))

    async def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        def run(conn: sqlite3.Connection) -> list[Any]:
            try:
                return conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    return []
                raise

        return await self.backend._read(run)

    async def record(self, mig_id: str) -> dict[str, Any] | None:
        rows = await self._rows("SELECT record FROM _migrations WHERE id = ?1", (mig_id,))
        return orjson.loads(rows[0][0]) if rows else None

    async def create(self, record: dict[str, Any]) -> None:
        args = _record_args(record)
        sql = _SAVE.split(" ON CONFLICT")[0] + " ON CONFLICT (id) DO NOTHING"
        await self.backend._write(None, lambda conn: conn.execute(sql, args))

    async def records(self) -> list[dict[str, Any]]:
        return [
            orjson.loads(r[0])
            for r in await self._rows("SELECT record FROM _migrations ORDER BY id")
        ]

    async def lock_holder(self) -> str | None:
        return await asyncio.to_thread(self._holder)

    def _holder(self) -> str | None:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def index_sql(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> str:
        predicate = None
        if index.partial_filter is not None:
            predicate = FilterCompiler(Params(), Names()).where(_partial(index), "doc")
        return index_ddl(collection, index, kinds, predicate)

    @asynccontextmanager
    async def session(self, runner: str, *, lock: bool = True) -> AsyncIterator[SqliteSession]:
        """A connection of its own, with the file lock held (waits for it)."""
        fd = None
        if lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.1)
                os.ftruncate(fd, 0)
                os.pwrite(fd, runner.encode(), 0)
            except BaseException:
                os.close(fd)
                raise
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dbproxy-migrate")
        conn: sqlite3.Connection | None = None
        try:
            state = ConnState(_TIMEOUT)
            busy = self.backend._busy_ms
            conn = await asyncio.get_running_loop().run_in_executor(
                thread, lambda: connect(self.path, state, writes=True, busy_ms=busy)
            )
            yield SqliteSession(self, conn, thread, state)
        finally:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
            thread.shutdown(wait=False)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # frees the lock (and the OS frees it if the process dies)


class SqliteSession:
    def __init__(
        self,
        store: SqliteMigrations,
        conn: sqlite3.Connection,
        thread: concurrent.futures.ThreadPoolExecutor,
        state: ConnState,
    ) -> None:
        self.store = store
        self.conn = conn
        self.thread = thread
        self.state = state

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            self.state.failure = None
            try:
                return fn(self.conn)
            except ProxyError:
                raise
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise _duplicate(exc, "?") from None
                raise translate(exc, self.state) from None
            except Exception as exc:
                raise translate(exc, self.state) from None

        return await asyncio.get_running_loop().run_in_executor(self.thread, run)

    async def save(self, record: dict[str, Any]) -> None:
        async with self.transaction() as tx:
            await tx.save(record)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """BEGIN IMMEDIATE on the session's connection, with the store's writer on loan
        (no other write of this process runs meanwhile; other processes wait)."""
        loan = await self.store.backend.borrow_writer(False)
        try:
            await self.call(lambda conn: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield SqliteTx(self)
            except BaseException:
                await asyncio.shield(self.call(_rollback))
                raise
            await self.call(lambda conn: conn.execute("COMMIT"))
        finally:
            loan.set()

    async def count(self, collection: str, flt: Filter | None) -> int:
        params = Params()
        where = FilterCompiler(params, Names()).where(flt, "t.doc") if flt is not None else "1"
        sql = f"SELECT count(*) FROM {table_name(collection)} t WHERE {where}"

        def run(conn: sqlite3.Connection) -> int:
            try:
                return int(conn.execute(sql, params.values).fetchone()[0])
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    return 0
                raise

        return await self.call(run)

    async def build_index_online(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> bool:
        return False  # SQLite builds every index inside a transaction


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class SqliteTx:
    def __init__(self, session: SqliteSession) -> None:
        self.session = session
        self.call = session.call

    async def stored_schema(self, collection: str) -> tuple[int, dict[str, Any]] | None:
        def run(conn: sqlite3.Connection) -> tuple[int, dict[str, Any]] | None:
            row = conn.execute(
                "SELECT version, schema FROM _schemas WHERE collection = ?1", (collection,)
            ).fetchone()
            return None if row is None else (int(row[0]), orjson.loads(row[1]))

        return await self.call(run)

    async def write_schema(self, collection: str, schema: dict[str, Any] | None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if schema is None:
                conn.execute("DELETE FROM _schemas WHERE collection = ?1", (collection,))
                return
            conn.execute(
                "INSERT INTO _schemas AS s (collection, schema) VALUES (?1, ?2) "
                "ON CONFLICT (collection) DO UPDATE SET schema = excluded.schema, "
                f"version = s.version + 1, updated_at = {NOW}",
                (collection, orjson.dumps(schema).decode()),
            )

        await self.call(run)

    async def table_exists(self, collection: str) -> bool:
        name = table_name(collection)[1:-1]

        def run(conn: sqlite3.Connection) -> bool:
            sql = "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1"
            return conn.execute(sql, (name,)).fetchone() is not None

        return await self.call(run)

    async def needs_online(self, collection: str) -> bool:
        return False  # SQLite builds every index inside a transaction

    async def create_collection(self, collection: str) -> None:
        await self.call(lambda conn: create_table(conn, collection))

    async def create_partitioned(self, collection: str, spec: Partitioning) -> None:
        raise BadRequest(
            "the embedded store cannot partition a collection (PostgreSQL can)",
            code="unsupported_by_backend",
            details={"feature": "partitioning", "strategy": spec.strategy},
        )

    async def partitioning(self, collection: str) -> Partitioning | None:
        return None

    async def begin_partitioning(self, collection: str, spec: Partitioning) -> int:
        await self.create_partitioned(collection, spec)
        return 0

    async def copy_partition_batch(
        self, collection: str, spec: Partitioning, after: str, size: int
    ) -> tuple[int, str | None]:
        return 0, None

    async def finish_partitioning(
        self,
        collection: str,
        spec: Partitioning,
        indexes: tuple[IndexSpec, ...],
        kinds: dict[tuple[str, ...], str],
    ) -> None:
        await self.create_partitioned(collection, spec)

    async def abandon_partitioning(self, collection: str) -> None:
        return None

    async def drop_collection(self, collection: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            for ddl in drop_ddl(collection):
                conn.execute(ddl)
            conn.execute(f"DROP TABLE IF EXISTS {table_name(collection)}")

        await self.call(run)

    async def set_search(self, collection: str, declared: SearchDeclaration | None) -> None:
        """The FTS5 table and its triggers, replaced whole in the migration's transaction."""

        def run(conn: sqlite3.Connection) -> None:
            create_table(conn, collection)
            for ddl in drop_ddl(collection):
                conn.execute(ddl)
            for ddl in search_ddl(collection, declared) if declared is not None else ():
                conn.execute(ddl)

        await self.call(run)

    async def create_index(
        self, collection: str, index: IndexSpec, kinds: dict[tuple[str, ...], str]
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            create_table(conn, collection)
            ddl = index_ddl(collection, index, kinds, _predicate(conn, index))
            conn.execute("SAVEPOINT ix")
            try:
                conn.execute(ddl)
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK TO ix")
                raise _duplicate(exc, index.name) from None
            except sqlite3.OperationalError as exc:
                conn.execute("ROLLBACK TO ix")
                if index.partial_filter is not None and "prohibited" in str(exc):
                    raise BadRequest(
                        f"index {index.name!r}: this partial_filter cannot be an index "
                        "predicate in the embedded store (only plain comparisons can)",
                        code="unsupported",
                        details={"index": index.name, "feature": "partial_filter"},
                    ) from None
                raise
            finally:
                conn.execute("RELEASE ix")

        await self.call(run)

    async def drop_index(self, collection: str, name: str) -> None:
        physical = physical_index_name(collection, name)
        await self.call(lambda conn: conn.execute(f'DROP INDEX IF EXISTS "{physical}"'))

    async def sql(self, text: str) -> None:
        raise BadRequest("the sql operation needs PostgreSQL", code="unsupported")

    async def scan(
        self, collection: str, after: str, size: int
    ) -> list[tuple[str, dict[str, Any]]]:
        sql = f"SELECT _id, doc FROM {table_name(collection)} WHERE _id > ?1 ORDER BY _id LIMIT ?2"

        def run(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            try:
                rows = conn.execute(sql, (after, size)).fetchall()
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    return []
                raise
            return [(r[0], orjson.loads(r[1])) for r in rows]

        return await self.call(run)

    async def apply_batch(
        self, collection: str, flt: Filter, update: Update, after: str, size: int, audit: str
    ) -> Batch:
        table = table_name(collection)
        params = Params()
        names = Names()
        a, n = params.add(after), params.add(size)
        where = FilterCompiler(params, names).where(flt, "s.doc")
        new = UpdateCompiler(params, names).document_expr(update, "t.doc")
        sql = (
            f"UPDATE {table} AS t SET doc = json_set({new}, '$.\"_id\"', t._id, "
            "'$.\"_version\"', t._version + 1), _version = t._version + 1, "
            f"updated_at = {NOW} WHERE t._id IN (SELECT s._id FROM {table} s "
            f"WHERE s._id > {a} AND {where} ORDER BY s._id LIMIT {n}) RETURNING _id, doc"
        )
        values = params.values
        audited = self.session.store.backend.audit

        def run(conn: sqlite3.Connection) -> Batch:
            try:
                rows = sorted(conn.execute(sql, values).fetchall())
            except sqlite3.OperationalError as exc:
                if no_table(exc):
                    return Batch([], [])
                raise
            ids = [r[0] for r in rows]
            if ids and audited:
                ids_text = orjson.dumps(ids).decode()
                row = (time.time(), "dbproxy-migrate", "backfill", collection, ids_text, audit)
                conn.execute(AUDIT_INSERT, row)
            return Batch(ids, [orjson.loads(r[1]) for r in rows])

        return await self.call(run)

    async def save(self, record: dict[str, Any]) -> None:
        args = _record_args(record)
        await self.call(lambda conn: conn.execute(_SAVE, args))


def _record_args(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["id"],
        record.get("version", 0),
        record["status"],
        record["checksum"],
        orjson.dumps(record).decode(),
    )
