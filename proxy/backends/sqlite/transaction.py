"""One open transaction of the SQLite store, on a connection of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy import context
from proxy.backends.base import TxKind
from proxy.backends.sqlite.connection import ConnState, Job, T
from proxy.backends.sqlite.ddl import AUDIT_INSERT, create_table
from proxy.backends.sqlite.documents import SqliteDocuments
from proxy.backends.sqlite.errors import translate
from proxy.config import Limits
from proxy.errors import Conflict, ProxyError
from proxy.ids import IdGenerator
from proxy.query.spec import StoredReply, check_fingerprint


class TransactionHost(Protocol):
    """What a transaction needs of its backend: settings, the writer on loan, and a home for
    its connection when it ends."""

    name: str
    limits: Limits
    ids: IdGenerator
    audit: bool

    async def borrow_writer(self, interactive: bool) -> threading.Event: ...

    def writer_returned(self) -> None: ...

    def end_transaction(self, conn: sqlite3.Connection, state: ConnState) -> None: ...


class SqliteTransaction(SqliteDocuments):
    """The document operations inside one open transaction, on its own connection.

    As on PostgreSQL, a failed statement ends the transaction's usefulness: it is marked
    failed and only ``rollback`` remains. ``commit``/``rollback`` always release the write
    gate and the connection."""

    def __init__(
        self,
        backend: TransactionHost,
        threads: concurrent.futures.ThreadPoolExecutor,
        conn: sqlite3.Connection,
        state: ConnState,
        isolation: str,
        release_slot: Callable[[], None],
        kind: TxKind = TxKind.SINGLE,
    ) -> None:
        super().__init__(backend.name, backend.limits, backend.ids, backend.audit)
        self.isolation = isolation
        self.failed: ProxyError | None = None
        self.closed = False
        self._backend = backend
        self._threads = threads
        self._conn = conn
        self._state = state
        self._lock = threading.Lock()  # one statement at a time, even after a cancellation
        self._loan: threading.Event | None = None  # set it to give the writer back
        self._release_slot: Callable[[], None] | None = release_slot
        self._tables: set[str] = set()
        self._interactive = kind is TxKind.INTERACTIVE
        self._counted = False  # among the backend's interactive writers

    def _check_usable(self) -> None:
        if self.closed:
            raise Conflict("the transaction has already ended", code="transaction_closed")
        if self.failed is not None:
            raise Conflict(
                "an earlier statement failed; the transaction can only be rolled back",
                code="transaction_aborted",
            )

    async def _call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._locked, fn)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    def _execute(self, fn: Job[T]) -> T:
        """Run a job on the connection; a database error marks the transaction failed."""
        state = self._state
        state.arm()
        try:
            return fn(self._conn)
        except ProxyError:
            raise  # raised by our code after the statement (not found, duplicate...)
        except Exception as exc:
            self.failed = translate(exc, state)
            raise self.failed from None
        finally:
            state.disarm()

    async def _write(self, collection: str | None, fn: Job[T]) -> T:
        self._check_usable()
        if self._loan is None:  # the first write: borrow the writer until the end
            self._loan = await self._backend.borrow_writer(self._interactive)
            if self.closed:  # ended while we waited
                self._loan.set()
                if self._interactive:
                    self._backend.writer_returned()
                self._check_usable()
            self._counted = self._interactive

        def run() -> T:
            if collection is not None and collection not in self._tables:
                self._execute(lambda conn: create_table(conn, collection))
                self._tables.add(collection)
            return self._execute(fn)

        return await self._call(run)

    async def _read(self, fn: Job[T]) -> T:
        self._check_usable()
        return await self._call(lambda: self._execute(fn))

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None:
        """Claim an idempotency key in this transaction, or return the reply stored for it.

        A concurrent request with the same key waits for the write gate until the first
        one ends: then its committed reply is returned here, or (rolled back) it claims."""
        now = time.time()

        def run(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            claimed = conn.execute(
                "INSERT INTO _idempotency AS t (key, fingerprint, expires_at) VALUES (?1, ?2, ?3) "
                "ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "status = NULL, headers = NULL, body = NULL, expires_at = excluded.expires_at "
                "WHERE t.expires_at < ?4 RETURNING 1",
                (key, fingerprint, now + ttl, now),
            ).fetchone()
            if claimed is not None:
                return None
            row: tuple[Any, ...] = conn.execute(
                "SELECT fingerprint, status, headers, body FROM _idempotency WHERE key = ?1",
                (key,),
            ).fetchone()
            return row

        row = await self._write(None, run)
        if row is None:
            return None
        fp, status, headers, body = row
        check_fingerprint(fp, fingerprint)
        return StoredReply(int(status), bytes(body), orjson.loads(headers))

    async def idem_save(self, key: str, reply: StoredReply) -> None:
        headers = orjson.dumps(reply.headers).decode()
        await self._write(
            None,
            lambda conn: conn.execute(
                "UPDATE _idempotency SET status = ?2, headers = ?3, body = ?4 WHERE key = ?1",
                (key, reply.status, headers, reply.body),
            ),
        )

    async def commit(self) -> None:
        """COMMIT (durable when it returns); shielded, so a client that goes away cannot
        leave the connection half-done. A failed COMMIT rolls back: nothing was applied."""
        self._check_usable()
        self.closed = True
        ctx = context.current.get()
        try:
            await asyncio.shield(self._call(lambda: self._commit(ctx.service, ctx.request_id)))
        finally:
            self._free_slot()

    def _commit(self, service: str, request_id: str) -> None:
        """The ``transaction_commit`` audit row (when the transaction changed documents;
        its writes hold the write gate), then COMMIT: both or neither."""
        try:
            if self.audit and self.wrote and self._loan is not None:
                self._state.arm()
                try:
                    row = (time.time(), service, "transaction_commit", "*", "[]", request_id)
                    self._conn.execute(AUDIT_INSERT, row)
                finally:
                    self._state.disarm()
            self._conn.execute("COMMIT")
        except Exception as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise translate(exc, self._state) from None
        finally:
            self._finish()

    async def rollback(self) -> None:
        """ROLLBACK and give the connection back; idempotent, shielded from cancellation."""
        if self.closed:
            return
        self.closed = True
        try:
            await asyncio.shield(self._call(self._rollback))
        finally:
            self._free_slot()

    def _free_slot(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()
        if self._counted:
            self._counted = False
            self._backend.writer_returned()

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        loan, self._loan = self._loan, None
        if loan is not None:
            loan.set()
        self._backend.end_transaction(self._conn, self._state)
