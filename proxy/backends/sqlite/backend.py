"""The embedded SQLite backend: lifecycle, the readers, the writer and transactions wired
together, health, housekeeping and the audit log."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from proxy.backends.base import Capabilities, TransactionShare, TxKind, Unsupported
from proxy.backends.sqlite.connection import ConnState, Job, T, connect
from proxy.backends.sqlite.ddl import (
    create_housekeeping_tables,
    create_table,
    make_parent_dir,
    table_name,
)
from proxy.backends.sqlite.describe import describe_collection as describe_one
from proxy.backends.sqlite.describe import load_schemas as read_schemas
from proxy.backends.sqlite.documents import SqliteDocuments
from proxy.backends.sqlite.errors import no_table, translate
from proxy.backends.sqlite.migrations import SqliteMigrations
from proxy.backends.sqlite.transaction import SqliteTransaction
from proxy.backends.sqlite.writer import WriterThread
from proxy.config import DatabaseConfig, Limits
from proxy.errors import BadRequest, PoolExhausted, ProxyError, Unavailable
from proxy.ids import IdGenerator
from proxy.query.spec import AuditScope

log = logging.getLogger(__name__)
SCHEMA_POLL_SECONDS = 1.0  # how soon a migration another process ran on the file is enforced

ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
_IDLE_TX_CONNECTIONS = 8  # connections kept for the next transaction
_WRITER_WAIT = 0.25  # seconds a write may wait for a writer an interactive transaction holds
_AUDIT_SELECT = (
    "SELECT id, at, service, operation, collection, ids, request_id, outcome FROM _audit "
    "WHERE (?1 IS NULL OR service = ?1) AND (?2 IS NULL OR collection = ?2) "
    "AND (?3 IS NULL OR at >= ?3) AND (?4 IS NULL OR at < ?4) "
    "AND (?5 IS NULL OR id > ?5) "
    "AND (?7 OR collection IN (SELECT value FROM json_each(?8)) "
    "OR EXISTS (SELECT 1 FROM json_each(?9) g WHERE collection GLOB g.value) "
    "OR (collection = '*' AND service = ?10)) ORDER BY id LIMIT ?6"
)
_AUDIT_COLUMNS = ("id", "at", "service", "operation", "collection", "ids", "request_id", "outcome")


def _not_open() -> Unavailable:
    return Unavailable("the embedded store is not open", retry_after=1)


def _give_back(loan: concurrent.futures.Future[threading.Event]) -> None:
    if not loan.cancelled() and loan.exception() is None:
        loan.result().set()


class SqliteBackend(Unsupported, SqliteDocuments):
    """Documents in ``"c_<collection>"``: _id TEXT PK, doc TEXT (JSON), _version, timestamps."""

    capabilities = Capabilities(
        audit_log=True, explain=True, schemas=True, aggregate=True, search=True
    )

    def __init__(
        self,
        config: DatabaseConfig,
        limits: Limits,
        *,
        path: str,
        ids: IdGenerator | None = None,
        audit: bool = True,
    ) -> None:
        super().__init__(config.name, limits, ids or IdGenerator(), audit)
        self.config = config
        self.path = path
        self._timeout = limits.statement_timeout_seconds
        self._busy_ms = max(1, int(limits.statement_timeout_seconds * 1000))
        self._acquire_timeout = config.pool_settings.timeout_seconds
        self._readers_max = max(1, config.pool_settings.max_connections)
        self._writer: WriterThread | None = None
        self._tx_slots: asyncio.Semaphore | None = None
        # batches and interactive transactions leave a quarter of the slots to single writes
        self.transaction_share = TransactionShare(self._readers_max)
        self._interactive_writers = 0  # interactive transactions holding or awaiting the gate
        self._open_transactions: weakref.WeakSet[SqliteTransaction] = weakref.WeakSet()
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._tx_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._conns_lock = threading.Lock()
        self._reader_conns: list[sqlite3.Connection] = []
        self._idle_tx_conns: list[tuple[sqlite3.Connection, ConnState]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(make_parent_dir, self.path)
        except OSError as exc:
            raise Unavailable(
                f"cannot create the directory of the sqlite store ({exc.strerror})"
            ) from None
        max_loan = self.limits.transaction_max_lifetime_seconds + 30.0
        writer = WriterThread(self.path, ConnState(self._timeout), self._busy_ms, max_loan)
        try:
            await asyncio.wrap_future(writer.start())
        except Exception as exc:
            log.error("cannot open the sqlite store %s: %s", self.path, type(exc).__name__)
            raise Unavailable("cannot open the embedded store", retry_after=1) from None
        self._writer = writer
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._readers_max, thread_name_prefix="dbproxy-sqlite-read"
        )
        # transactions: at most max_connections at once, each with its own connection
        self._tx_slots = asyncio.Semaphore(self._readers_max)
        self._tx_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._readers_max + 1, thread_name_prefix="dbproxy-sqlite-tx"
        )
        await self._write(None, create_housekeeping_tables)
        log.info(
            "sqlite store %s open at %s (WAL, synchronous=FULL, %d readers)",
            self.name,
            self.path,
            self._readers_max,
        )

    async def close(self) -> None:
        for tx in list(self._open_transactions):
            await tx.rollback()  # gives the writer back before it stops
        writer, readers, tx_threads = self._writer, self._readers, self._tx_threads
        self._writer = self._readers = self._tx_threads = None
        if writer is not None:
            await asyncio.to_thread(writer.stop)
        for pool in (readers, tx_threads):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, True)
        with self._conns_lock:
            conns = self._reader_conns + [c for c, _ in self._idle_tx_conns]
            self._reader_conns, self._idle_tx_conns = [], []
        for conn in conns:
            conn.close()

    async def health(self) -> dict[str, Any]:
        started = time.perf_counter()
        writer = self._writer
        if writer is None or not writer.alive():
            return {"status": "down", "error": "not_open"}
        try:
            await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        except ProxyError as err:
            return {"status": "down", "error": err.code}
        return {
            "status": "up",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "engine": "sqlite",
            "path": self.path,
            "durability": "wal, synchronous=full",
            "pool": {"readers": self._readers_max, "writer_queue": writer.pending()},
        }

    async def maintain(self) -> None:
        """Periodic housekeeping: forget expired idempotency keys (skipped while a
        transaction holds the writer: the next round does it)."""
        now = time.time()
        try:
            await self._write(
                None,
                lambda conn: conn.execute("DELETE FROM _idempotency WHERE expires_at < ?", (now,)),
            )
        except Unavailable as err:
            if err.code != "writer_busy":
                raise
            log.debug("housekeeping of %s skipped: a transaction holds the writer", self.name)

    async def explain(self, sql: str, args: tuple[Any, ...]) -> tuple[bool, str]:
        """The plan of a statement (EXPLAIN QUERY PLAN): whether it searches or scans an
        index, and its steps on one line."""

        def run(conn: sqlite3.Connection) -> list[str]:
            return [str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]

        none: list[str] = []
        steps = await self._read(self._reading(run, none))
        index_used = any(
            ("USING INDEX" in s or "USING COVERING INDEX" in s or "PRIMARY KEY" in s)
            and "AUTOMATIC" not in s  # a transient index the statement builds for itself
            for s in steps
        )
        return index_used, " > ".join(steps)[:500]

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
        s = scope or AuditScope((), (), "")
        globs = orjson.dumps([g.replace("[!", "[^") for g in s.globs]).decode()
        names = orjson.dumps(s.names).decode()
        args: tuple[Any, ...] = (service, collection, since, until, after_id, limit)
        args += (scope is None, names, globs, s.service)

        def run(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_AUDIT_SELECT, args).fetchall()

        no_rows: list[Any] = []
        rows = await self._read(self._reading(run, no_rows))
        out = []
        for row in rows:
            record = dict(zip(_AUDIT_COLUMNS, row, strict=True))
            record["ids"] = orjson.loads(record["ids"])
            out.append(record)
        return out

    def migrations(self) -> SqliteMigrations:
        """This store's migration side (records, lock, DDL) for proxy.migrate's runner."""
        return SqliteMigrations(self)

    async def load_schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return await self._read(read_schemas)

    async def watch_schemas(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: read the schemas table again every ``SCHEMA_POLL_SECONDS`` (a
        local read: another process's migration on the same file is seen within it)."""
        while True:
            try:
                await changed()
            except ProxyError as err:
                log.debug("schemas of %s not reloaded: %s", self.name, err.code)
            await asyncio.sleep(SCHEMA_POLL_SECONDS)

    async def describe_collection(self, collection: str, sample: int) -> dict[str, Any]:
        table = table_name(collection)
        return await self._read(lambda conn: describe_one(conn, table, sample))

    # -- running work ------------------------------------------------------------------

    async def _write(self, collection: str | None, fn: Job[T]) -> T:
        writer = self._writer
        if writer is None:
            raise _not_open()
        job = fn if collection is None else self._with_table(writer, collection, fn)
        future = writer.submit(job, time.monotonic() + self._acquire_timeout)
        if not self._interactive_writers:
            return await asyncio.wrap_future(future)
        return await self._wait_briefly(future)

    async def _wait_briefly(self, future: concurrent.futures.Future[T]) -> T:
        """Wait for the writer's answer, but give up on a job not started within
        ``_WRITER_WAIT`` (an interactive transaction holds the writer): 503 writer_busy."""
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), _WRITER_WAIT)
        except TimeoutError:
            if future.cancel():
                raise Unavailable(
                    "an open transaction holds the embedded store's writer; retry shortly",
                    code="writer_busy",
                    retry_after=1,
                ) from None
        except asyncio.CancelledError:
            future.cancel()
            raise
        return await waiting  # it started meanwhile: its outcome is the answer

    @staticmethod
    def _with_table(writer: WriterThread, collection: str, fn: Job[T]) -> Job[T]:
        """``fn`` after creating the table if needed (again if a rolled-back job made it)."""

        def job(conn: sqlite3.Connection) -> T:
            if collection not in writer.known_tables:
                create_table(conn, collection)
                writer.known_tables.add(collection)
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if not no_table(exc):
                    raise
                create_table(conn, collection)
                return fn(conn)

        return job

    async def _read(self, fn: Job[T]) -> T:
        readers = self._readers
        if readers is None:
            raise _not_open()
        start_by = time.monotonic() + self._acquire_timeout
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(readers, self._run_read, fn, start_by)
        except RuntimeError:  # the pool shut down under us
            raise Unavailable("the embedded store is closing", retry_after=1) from None

    def _run_read(self, fn: Job[T], start_by: float) -> T:
        if time.monotonic() > start_by:
            raise PoolExhausted("no database connection became free in time", retry_after=1)
        conn, state = self._reader()
        state.arm()
        try:
            return fn(conn)
        except ProxyError:
            raise
        except Exception as exc:
            raise translate(exc, state) from None
        finally:
            state.disarm()

    def _reader(self) -> tuple[sqlite3.Connection, ConnState]:
        pair: tuple[sqlite3.Connection, ConnState] | None = getattr(self._local, "pair", None)
        if pair is None:
            state = ConnState(self._timeout)
            try:
                conn = connect(self.path, state, writes=False, busy_ms=self._busy_ms)
            except sqlite3.Error as exc:
                raise translate(exc) from None
            with self._conns_lock:
                self._reader_conns.append(conn)
            pair = (conn, state)
            self._local.pair = pair
        return pair

    # -- transactions ------------------------------------------------------------------

    async def begin(
        self, isolation: str = "read_committed", kind: TxKind = TxKind.SINGLE
    ) -> SqliteTransaction:
        """A transaction on a connection of its own (all levels run as serializable);
        batches and interactive transactions only within the transaction share."""
        if isolation not in ISOLATION_LEVELS:
            raise BadRequest(
                f"isolation must be one of {', '.join(ISOLATION_LEVELS)}", code="invalid_isolation"
            )
        threads, slots = self._tx_threads, self._tx_slots
        if threads is None or slots is None:
            raise _not_open()
        share = self.transaction_share
        shared = await share.take(kind, self._acquire_timeout)

        def release() -> None:
            slots.release()
            if shared:
                share.give()

        try:
            await asyncio.wait_for(slots.acquire(), self._acquire_timeout)
        except BaseException as exc:
            if shared:
                share.give()
            if isinstance(exc, TimeoutError):
                raise PoolExhausted(
                    "no database connection became free in time", retry_after=1
                ) from None
            raise
        loop = asyncio.get_running_loop()
        try:
            conn, state = await loop.run_in_executor(threads, self._open_transaction)
        except BaseException as exc:
            release()
            if isinstance(exc, RuntimeError):
                raise Unavailable("the embedded store is closing", retry_after=1) from None
            raise
        tx = SqliteTransaction(self, threads, conn, state, isolation, release, kind)
        self._open_transactions.add(tx)
        return tx

    def _open_transaction(self) -> tuple[sqlite3.Connection, ConnState]:
        with self._conns_lock:
            pair = self._idle_tx_conns.pop() if self._idle_tx_conns else None
        try:
            if pair is None:
                state = ConnState(self._timeout)
                pair = (connect(self.path, state, writes=True, busy_ms=self._busy_ms), state)
            pair[0].execute("BEGIN DEFERRED")
        except sqlite3.Error as exc:
            if pair is not None:
                pair[0].close()
            raise translate(exc) from None
        return pair

    def end_transaction(self, conn: sqlite3.Connection, state: ConnState) -> None:
        """Keep a clean connection for the next transaction, or close it."""
        try:
            clean = not conn.in_transaction
        except sqlite3.ProgrammingError:  # closed already
            return
        if clean and self._tx_threads is not None:
            with self._conns_lock:
                if len(self._idle_tx_conns) < _IDLE_TX_CONNECTIONS:
                    self._idle_tx_conns.append((conn, state))
                    return
        conn.close()

    async def borrow_writer(self, interactive: bool) -> threading.Event:
        """Wait (without holding a thread) until the writer is lent to the caller; set the
        returned event to give it back. An interactive borrower is counted until it calls
        ``writer_returned``."""
        writer = self._writer
        if writer is None:
            raise _not_open()
        brief = self._interactive_writers > 0
        loan = writer.lend(time.monotonic() + self._acquire_timeout)
        if interactive:
            self._interactive_writers += 1
        try:
            return await (self._wait_briefly(loan) if brief else asyncio.wrap_future(loan))
        except BaseException as exc:
            if interactive:
                self._interactive_writers -= 1
            if isinstance(exc, asyncio.CancelledError):
                loan.add_done_callback(_give_back)  # a loan granted after we left goes back
            raise

    def writer_returned(self) -> None:
        self._interactive_writers -= 1
