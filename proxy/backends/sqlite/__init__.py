"""Embedded SQLite backend: one JSON-text table per collection in one file, off the event loop.

The only module that imports sqlite3. Every driver error is translated here into the error
hierarchy of ``proxy.errors``; no SQL or driver text leaves this module.

Concurrency. SQLite allows one writer at a time; here that rule is explicit. Plain writes
go through ONE writer thread with its own connection: it takes whatever is queued (up to
``_BATCH_MAX`` jobs), runs it in one ``BEGIN IMMEDIATE`` transaction with a SAVEPOINT per
job (a failing job rolls back alone) and answers the jobs only after COMMIT returned:
group commit, so ``synchronous=FULL`` costs one WAL fsync per batch, not per write.
Transactions (batches, interactive ones, idempotent writes) run on a connection of their
own (``BEGIN DEFERRED``, so many can be open and read at once) and take the process-wide
*write gate* before their first write, holding it until they end; the writer thread takes
the same gate for each batch. So only one connection of this process ever writes, and no
client sees "database is locked" (another process on the same file waits up to
``busy_timeout``, then 503). Reads run on a small thread pool, one connection per thread;
WAL lets them proceed while a write is under way.

Isolation. Every transaction is serializable (a snapshot, and one writer). A transaction
that read before its first write and meanwhile missed a commit cannot write on its
snapshot: 409 ``serialization_failure`` (retryable), even at ``read_committed``.

Durability. WAL with ``synchronous=FULL``: a write is acknowledged after the WAL was
synced, so it survives power loss, not only a crash of the process (``NORMAL`` would
not).

Audit. Every document change writes its row into ``_audit`` in the same job (its
savepoint, or the transaction), and a transaction that changed documents adds a
``transaction_commit`` row just before COMMIT: as on PostgreSQL, a change and its audit row
are committed or rolled back together.

Timeouts. Work that has not started within the pool's acquire timeout (a busy writer, a
write gate held by a batch) is refused with 503 ``pool_exhausted``; while an interactive
transaction holds the write gate (from its first write until it ends: SQLite cannot give
a write lock back earlier), other writes wait at most ``_WRITER_WAIT``, then 503
``writer_busy``, so nothing queues behind an idle transaction; a running
statement is interrupted by the progress handler after ``limits.statement_timeout_seconds``
(504 ``statement_timeout``). A single call of a Python helper (one regex match) cannot be
interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from proxy import context, numbers
from proxy.backends.base import (
    Capabilities,
    TransactionShare,
    TxKind,
    Unsupported,
    check_collection,
)
from proxy.config import DatabaseConfig, Limits
from proxy.errors import (
    BadRequest,
    Conflict,
    DuplicateId,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    NotFound,
    PoolExhausted,
    PreconditionFailed,
    ProxyError,
    Timeout,
    Unavailable,
)
from proxy.ids import IdGenerator
from proxy.query import sqlite as dialect
from proxy.query.ast import Filter
from proxy.query.spec import (
    AuditScope,
    Change,
    FindSpec,
    ItemResult,
    Keep,
    MergePatch,
    Modify,
    Page,
    Replace,
    StoredReply,
    WriteResult,
    check_fingerprint,
    keep_protected,
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

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]

DATA_FILE = "dbproxy.sqlite3"
ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
_BATCH_MAX = 64
_IDLE_TX_CONNECTIONS = 8  # connections kept for the next transaction
_WRITER_WAIT = 0.25  # seconds a write may wait for a writer an interactive transaction holds
_PROGRESS_STEPS = 4096  # VM instructions between two looks at the clock
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_INT64_MAX = 2**63 - 1
_TOO_COMPLEX = ("parser stack overflow", "too many", "too large", "too deep")
_IDEMPOTENCY_DDL = (
    "CREATE TABLE IF NOT EXISTS _idempotency (key TEXT PRIMARY KEY NOT NULL, "
    "fingerprint TEXT NOT NULL, status INTEGER, headers TEXT, body BLOB, "
    "expires_at REAL NOT NULL)"
)
_AUDIT_DDL = (
    "CREATE TABLE IF NOT EXISTS _audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "at REAL NOT NULL, service TEXT NOT NULL, operation TEXT NOT NULL, "
    "collection TEXT NOT NULL, ids TEXT NOT NULL, request_id TEXT NOT NULL, "
    "outcome TEXT NOT NULL DEFAULT 'committed')",
    "CREATE INDEX IF NOT EXISTS _audit_at ON _audit (at)",
)
_AUDIT_INSERT = (
    "INSERT INTO _audit (at, service, operation, collection, ids, request_id) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
)
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
_CHANGE_NAMES = {Replace: "replace", Modify: "update", MergePatch: "patch"}


def table_name(collection: str) -> str:
    """The quoted table of a collection. SQLite folds identifier case, so each capital is
    marked (``Users`` → ``"c_^Users"``) and ``Users`` and ``users`` stay apart; the prefix
    keeps clear of SQLite's reserved ``sqlite_`` names and of ``_idempotency``."""
    check_collection(collection)
    return '"c_' + "".join(f"^{ch}" if ch.isupper() else ch for ch in collection) + '"'


def sqlite_path(connection_string: str) -> str:
    """The file of a ``sqlite://`` URL: ``sqlite:///abs/file.sqlite3`` is absolute,
    ``sqlite://rel/file.sqlite3`` relative to the working directory; a directory (or a path
    ending in ``/``) holds ``dbproxy.sqlite3``."""
    rest = connection_string.split("://", 1)[1] if "://" in connection_string else ""
    path = rest.split("?", 1)[0].split("#", 1)[0]
    if not path:
        raise ValueError("the sqlite URL names no file")
    if path.endswith("/") or os.path.isdir(path):
        path = os.path.join(path, DATA_FILE)
    return path


def check_location(path: str) -> str | None:
    """Why the store cannot live at ``path`` (None when it can): its directory is created
    if missing and must be writable; an existing file must be a readable, writable file.
    For start-up validation, before the port is bound."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return f"cannot create directory {directory!r}: {exc.strerror or type(exc).__name__}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory!r} is not writable"
    if os.path.exists(path):
        if not os.path.isfile(path):
            return f"{path!r} is not a regular file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path!r} is not readable and writable"
    return None


# ---- connections ------------------------------------------------------------------------


@dataclass(slots=True)
class _ConnState:
    """What the callbacks of one connection share with the code running its statements."""

    timeout: float
    deadline: float = math.inf
    failure: ProxyError | None = None

    def arm(self) -> None:
        self.deadline = time.monotonic() + self.timeout
        self.failure = None

    def disarm(self) -> None:
        self.deadline = math.inf


def _guarded(state: _ConnState, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep the ProxyError a helper raises: SQLite only reports "function raised"."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except ProxyError as err:
            state.failure = err
            raise
        except Exception as exc:
            name = getattr(fn, "__name__", "?")
            log.error("sqlite helper %s failed: %s", name, type(exc).__name__)
            state.failure = InternalError("unexpected error while evaluating the query")
            raise

    return call


def _fail(code: str, message: str) -> None:
    raise InvalidQuery(f"the update does not fit the stored document: {message}", code=code)


_FN_KEEP = "dbp_keep"  # (stored json, body json, Keep as json) -> the replacement


def _keep_text(keep: Keep) -> str:
    return orjson.dumps([sorted(keep.open), sorted(keep.partial)]).decode()


def _keep(stored: str | bytes, body: str | bytes, spec: str) -> str:
    """A full replacement that keeps what the caller may not write (``keep_protected``)."""
    open_paths, partial = orjson.loads(spec)
    keep = Keep(frozenset(open_paths), frozenset(partial))
    merged = keep_protected(dialect.loads(stored), dialect.loads(body), keep)
    return dialect.json_text(merged)


def _connect(path: str, state: _ConnState, *, writes: bool, busy_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=512
    )
    try:
        for name, n_args, fn in (
            (dialect.FN_REGEXP, 3, dialect.regex_search),
            (dialect.FN_CANON, 1, dialect.canonical_json),
            (dialect.FN_CMP, 2, dialect.compare_json_sql),
            (dialect.FN_ARITH, 3, dialect.arith),
        ):
            conn.create_function(name, n_args, _guarded(state, fn), deterministic=True)
        conn.create_function(dialect.FN_FAIL, 2, _guarded(state, _fail))  # never constant-folded
        conn.create_function(_FN_KEEP, 3, _guarded(state, _keep), deterministic=True)
        conn.create_collation(dialect.COLLATION, dialect.compare_json)
        conn.set_progress_handler(lambda: time.monotonic() > state.deadline, _PROGRESS_STEPS)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if writes:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("sqlite store %s: WAL unavailable (journal_mode=%s)", path, mode)
            conn.execute("PRAGMA synchronous = FULL")  # per connection: every writer sets it
        else:
            conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn


def translate(exc: BaseException, state: _ConnState | None = None) -> ProxyError:
    """Map a driver exception to a client-facing error (retryable or not)."""
    if isinstance(exc, ProxyError):
        return exc
    if state is not None and state.failure is not None:
        return state.failure
    if isinstance(exc, OverflowError):
        return InvalidQuery("a number is out of range for the database", code="invalid_value")
    if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
        return DuplicateId("a document with this _id already exists")
    if not isinstance(exc, sqlite3.Error):
        log.error("unexpected error in the sqlite store: %s", type(exc).__name__)
        return InternalError("unexpected error while talking to the database")
    name = getattr(exc, "sqlite_errorname", "") or ""
    message = str(exc)
    if name == "SQLITE_INTERRUPT" or message == "interrupted":
        return Timeout("the statement took longer than the configured timeout")
    if name == "SQLITE_BUSY_SNAPSHOT":
        return Conflict(
            "the transaction read data that another write has changed since; retry it",
            code="serialization_failure",
            retryable=True,
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return Unavailable("the embedded store is busy", retry_after=1)
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_NOMEM")):
        log.error("sqlite store unavailable: %s", name)
        return Unavailable("the embedded store cannot be written", retry_after=1)
    if name == "SQLITE_TOOBIG" or any(s in message for s in _TOO_COMPLEX):
        return LimitExceeded("the request is too complex for the database", code="too_complex")
    log.error("unexpected sqlite error %s (%s)", name or type(exc).__name__, message[:200])
    return InternalError("unexpected database error")


def _no_table(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such table")


def _make_parent_dir(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _create_table(conn: sqlite3.Connection, collection: str) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {table_name(collection)} ("
        "_id TEXT PRIMARY KEY NOT NULL, doc TEXT NOT NULL, "
        "_version INTEGER NOT NULL DEFAULT 1, "
        f"created_at TEXT NOT NULL DEFAULT ({_NOW}), "
        f"updated_at TEXT NOT NULL DEFAULT ({_NOW}))"
    )


def _create_housekeeping_tables(conn: sqlite3.Connection) -> None:
    conn.execute(_IDEMPOTENCY_DDL)
    for ddl in _AUDIT_DDL:
        conn.execute(ddl)


def _give_back(loan: concurrent.futures.Future[threading.Event]) -> None:
    if not loan.cancelled() and loan.exception() is None:
        loan.result().set()


def _version_param(if_match: int) -> int:
    """If-Match as a bindable integer; one no version can have when out of range."""
    return if_match if 0 < if_match <= _INT64_MAX else -1


# ---- the writer -------------------------------------------------------------------------


@dataclass(slots=True)
class _WriteJob:
    """A write to run, or (``fn`` None) a loan of the writer to a transaction."""

    fn: Job[Any] | None
    future: concurrent.futures.Future[Any]
    start_by: float
    outcome: tuple[Any, ProxyError | None] = field(default=(None, None))


class _Writer:
    """The thread (and connection) of plain writes, and the gate of all writes: a
    transaction borrows it (``lend``) for its first write and gives it back when it ends;
    meanwhile this thread waits, so no two connections of the process ever write at once."""

    def __init__(self, path: str, state: _ConnState, busy_ms: int, max_loan: float) -> None:
        self.path = path
        self.state = state
        self.known_tables: set[str] = set()  # touched by this thread only
        self._busy_ms = busy_ms
        self._max_loan = max_loan
        self._queue: queue.SimpleQueue[_WriteJob | None] = queue.SimpleQueue()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="dbproxy-sqlite-writer", daemon=True)
        self._stopping = False

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return self._opened

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, fn: Job[T], start_by: float) -> concurrent.futures.Future[T]:
        if not self.alive():
            raise Unavailable("the embedded store is not open for writing", retry_after=1)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_WriteJob(fn, future, start_by))
        return future

    def lend(self, start_by: float) -> concurrent.futures.Future[threading.Event]:
        """The writer, once it gets there: the future's event gives it back."""
        if not self.alive():
            raise Unavailable("the embedded store is not open for writing", retry_after=1)
        future: concurrent.futures.Future[threading.Event] = concurrent.futures.Future()
        self._queue.put(_WriteJob(None, future, start_by))
        return future

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        """Finish what is queued, then close the connection and end the thread."""
        if self._thread.is_alive():
            self._stopping = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = _connect(self.path, self.state, writes=True, busy_ms=self._busy_ms)
        except BaseException as exc:
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            self._loop(conn)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

    def _loop(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            stop = False
            while len(items) < _BATCH_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            try:
                self._run_items(conn, items)
            except Exception as exc:  # a bug or a dying disk: nobody may wait forever
                log.error("sqlite writer failed: %s", type(exc).__name__)
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                err = translate(exc)
                for item in items:
                    if not item.future.done():
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            item.future.set_exception(err)
            if stop:
                return

    def _run_items(self, conn: sqlite3.Connection, items: list[_WriteJob]) -> None:
        """Consecutive writes run as one batch; a loan runs between two batches."""
        batch: list[_WriteJob] = []
        for item in items:
            if item.fn is not None:
                batch.append(item)
                continue
            self._run_batch(conn, batch)
            batch = []
            self._lend(item)
        self._run_batch(conn, batch)

    def _lend(self, loan: _WriteJob) -> None:
        if not loan.future.set_running_or_notify_cancel():
            return  # the transaction gave up waiting
        if time.monotonic() > loan.start_by:
            loan.future.set_exception(
                PoolExhausted("the embedded store's writer is busy; retry", retry_after=1)
            )
            return
        back = threading.Event()
        loan.future.set_result(back)
        if not back.wait(self._max_loan):  # the registry's reaper ends transactions sooner
            log.error("a transaction kept the sqlite writer for %.0f s", self._max_loan)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_WriteJob]) -> None:
        """Run the jobs in one transaction; answer them after COMMIT."""
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        while jobs:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except Exception as exc:
                self._answer(jobs, translate(exc))
                return
            lost_at = self._run_jobs(conn, jobs)
            if lost_at is not None:  # an error rolled the whole transaction back: redo the rest
                failed = jobs[lost_at]
                failed.future.set_exception(failed.outcome[1] or InternalError("write failed"))
                jobs = jobs[:lost_at] + jobs[lost_at + 1 :]
                continue
            try:
                conn.execute("COMMIT")
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._answer(jobs, translate(exc))
                return
            self._answer(jobs, None)
            return

    def _run_jobs(self, conn: sqlite3.Connection, jobs: list[_WriteJob]) -> int | None:
        """Each job under its own savepoint; the index of a job whose error ended the whole
        transaction (SQLite does that for an interrupt, a full disk...), else None."""
        state = self.state
        for i, job in enumerate(jobs):
            assert job.fn is not None
            if time.monotonic() > job.start_by:
                job.outcome = (None, PoolExhausted("the writer is busy; retry", retry_after=1))
                continue
            conn.execute("SAVEPOINT job")
            state.arm()
            try:
                result = job.fn(conn)
            except Exception as exc:
                job.outcome = (None, translate(exc, state))
                if not conn.in_transaction:
                    return i
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            else:
                job.outcome = (result, None)
                conn.execute("RELEASE job")
            finally:
                state.disarm()
        return None

    @staticmethod
    def _answer(jobs: list[_WriteJob], commit_error: ProxyError | None) -> None:
        for job in jobs:
            result, error = job.outcome
            if error is None and commit_error is not None:
                error = commit_error
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)


# ---- the document operations --------------------------------------------------------------


class _Documents:
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
                conn.execute(_AUDIT_INSERT, (*row, request_id))
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
                if _no_table(exc):
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
        sql = f"INSERT INTO {table} (_id, doc) VALUES (?1, ?2) ON CONFLICT (_id) DO NOTHING"

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
        sql = f"INSERT INTO {table} (_id, doc) VALUES (?1, ?2) ON CONFLICT (_id) DO NOTHING"

        def run(conn: sqlite3.Connection) -> list[bool]:
            # a repeated _id in the same batch: the first one wins, as in PostgreSQL
            return [conn.execute(sql, pair).rowcount == 1 for pair in pairs]

        def written(done: list[bool]) -> list[str]:
            return [pair[0] for pair, ok in zip(pairs, done, strict=True) if ok]

        job = self._audited(run, "create", collection, written)
        inserted = iter(await self._write(collection, job) if pairs else [])
        duplicate = DuplicateId("a document with this _id already exists").to_dict()
        out: list[ItemResult] = []
        for p in prepared:
            if isinstance(p, ItemResult):
                out.append(p)
            elif next(inserted):
                out.append(ItemResult(201, p[0], 1))
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
        guard: Filter | None = None,
    ) -> WriteResult:
        """Replace, update or patch one document in one statement. ``guard`` (row rules)
        must hold for the stored document, else it counts as not found."""
        table = table_name(collection)
        params = Params([doc_id])
        names = Names()
        new_doc = self._new_doc_sql(change, params, names, doc_id, "t.doc")
        set_clause = (
            f"doc = json_set({new_doc}, '$.\"_id\"', t._id, '$.\"_version\"', t._version + 1), "
            f"_version = t._version + 1, updated_at = {_NOW}"
        )
        returning = "RETURNING CAST(doc AS BLOB), _version"
        conds = self._conditions(params, names, if_match, guard)
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
        visible = self._visible_sql(table, guard)

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

    @staticmethod
    def _conditions(
        params: Params, names: Names, if_match: int | None, guard: Filter | None
    ) -> str:
        parts = []
        if if_match is not None:
            parts.append(f"t._version = {params.add(_version_param(if_match))}")
        if guard is not None:
            parts.append(FilterCompiler(params, names).where(guard))
        return " AND ".join(parts)

    @staticmethod
    def _visible_sql(table: str, guard: Filter | None) -> tuple[str, list[Any]]:
        """A query finding the document ``?1`` among the caller's rows."""
        if guard is None:
            return f"SELECT 1 FROM {table} t WHERE t._id = ?1", []
        params = Params([None])
        where = FilterCompiler(params).where(guard)
        return f"SELECT 1 FROM {table} t WHERE t._id = ?1 AND {where}", params.values[1:]

    @staticmethod
    def _new_doc_sql(change: Change, params: Params, names: Names, doc_id: str, base: str) -> str:
        if isinstance(change, Replace):
            body = params.add(_Documents._dump({"_id": doc_id, **change.doc}).decode())
            if change.keep is None:
                return body
            # kept fields come from the row this statement writes over: no read-modify-write
            return f"{_FN_KEEP}({base}, {body}, {params.add(_keep_text(change.keep))})"
        if isinstance(change, Modify):
            return UpdateCompiler(params, names).document_expr(change.update, base)
        assert isinstance(change, MergePatch)
        return f"json_patch({base}, {params.add(_Documents._dump(change.patch).decode())})"

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
        guard: Filter | None = None,
    ) -> int:
        table = table_name(collection)
        params = Params([doc_id])
        conds = self._conditions(params, Names(), if_match, guard)
        sql = (
            f"DELETE FROM {table} AS t WHERE t._id = ?1{' AND ' + conds if conds else ''} "
            "RETURNING _version"
        )
        values = params.values
        visible = self._visible_sql(table, guard)

        def run(conn: sqlite3.Connection) -> int:
            try:
                row = conn.execute(sql, values).fetchone()
            except sqlite3.OperationalError as exc:
                if _no_table(exc):
                    raise NotFound("no document with this _id", details={"_id": doc_id}) from None
                raise
            if row is None:
                self._explain_miss(conn, visible, doc_id, if_match)
            return int(row[0])

        return await self._write(None, self._audited(run, "delete", collection, lambda _: [doc_id]))

    async def find(self, collection: str, spec: FindSpec) -> Page:
        params = Params()
        names = Names()
        where = FilterCompiler(params, names).where(spec.filter)
        exprs = sort_exprs(spec.sort, params, names=names)
        if spec.cursor is not None:
            cursor_values = decode_cursor(spec.cursor, spec.sort)
            where = f"{where} AND {after_cursor(exprs, cursor_values, params)}"
        keys = ", ".join(f"{e} AS k{i}" for i, (e, _) in enumerate(exprs))
        order = ", ".join(f"k{i} DESC" if desc else f"k{i}" for i, (_, desc) in enumerate(exprs))
        limit = params.add(spec.limit + 1)
        offset = params.add(spec.skip)
        sql = (
            f"SELECT CAST(t.doc AS BLOB), {keys} FROM {table_name(collection)} t WHERE {where} "
            f"ORDER BY {order} LIMIT {limit} OFFSET {offset}"
        )
        values = params.values

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
            nxt = encode_cursor(spec.sort, [last[i + 1] for i in range(len(exprs))])
        return Page([r[0] for r in rows], nxt)

    async def count(self, collection: str, flt: Filter) -> int:
        params = Params()
        where = FilterCompiler(params).where(flt)
        sql = f"SELECT count(*) FROM {table_name(collection)} t WHERE {where}"
        values = params.values

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, values).fetchone()[0])

        return await self._read(self._reading(run, 0))


# ---- the backend ------------------------------------------------------------------------


class SqliteBackend(Unsupported, _Documents):
    """Documents in ``"c_<collection>"``: _id TEXT PK, doc TEXT (JSON), _version, timestamps."""

    capabilities = Capabilities(audit_log=True)

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
        self._writer: _Writer | None = None
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
        self._idle_tx_conns: list[tuple[sqlite3.Connection, _ConnState]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(_make_parent_dir, self.path)
        except OSError as exc:
            raise Unavailable(
                f"cannot create the directory of the sqlite store ({exc.strerror})"
            ) from None
        max_loan = self.limits.transaction_max_lifetime_seconds + 30.0
        writer = _Writer(self.path, _ConnState(self._timeout), self._busy_ms, max_loan)
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
        await self._write(None, _create_housekeeping_tables)
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

    # -- running work ------------------------------------------------------------------

    async def _write(self, collection: str | None, fn: Job[T]) -> T:
        writer = self._writer
        if writer is None:
            raise Unavailable("the embedded store is not open", retry_after=1)
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
    def _with_table(writer: _Writer, collection: str, fn: Job[T]) -> Job[T]:
        """``fn`` after creating the table if needed (again if a rolled-back job made it)."""

        def job(conn: sqlite3.Connection) -> T:
            if collection not in writer.known_tables:
                _create_table(conn, collection)
                writer.known_tables.add(collection)
            try:
                return fn(conn)
            except sqlite3.OperationalError as exc:
                if not _no_table(exc):
                    raise
                _create_table(conn, collection)
                return fn(conn)

        return job

    async def _read(self, fn: Job[T]) -> T:
        readers = self._readers
        if readers is None:
            raise Unavailable("the embedded store is not open", retry_after=1)
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

    def _reader(self) -> tuple[sqlite3.Connection, _ConnState]:
        pair: tuple[sqlite3.Connection, _ConnState] | None = getattr(self._local, "pair", None)
        if pair is None:
            state = _ConnState(self._timeout)
            try:
                conn = _connect(self.path, state, writes=False, busy_ms=self._busy_ms)
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
            raise Unavailable("the embedded store is not open", retry_after=1)
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

    def _open_transaction(self) -> tuple[sqlite3.Connection, _ConnState]:
        with self._conns_lock:
            pair = self._idle_tx_conns.pop() if self._idle_tx_conns else None
        try:
            if pair is None:
                state = _ConnState(self._timeout)
                pair = (_connect(self.path, state, writes=True, busy_ms=self._busy_ms), state)
            pair[0].execute("BEGIN DEFERRED")
        except sqlite3.Error as exc:
            if pair is not None:
                pair[0].close()
            raise translate(exc) from None
        return pair

    def _end_transaction(self, conn: sqlite3.Connection, state: _ConnState) -> None:
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

    async def _borrow_writer(self, interactive: bool) -> threading.Event:
        """Wait (without holding a thread) until the writer is lent to the caller; set the
        returned event to give it back. An interactive borrower is counted until it calls
        ``_writer_returned``."""
        writer = self._writer
        if writer is None:
            raise Unavailable("the embedded store is not open", retry_after=1)
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

    def _writer_returned(self) -> None:
        self._interactive_writers -= 1


class SqliteTransaction(_Documents):
    """The document operations inside one open transaction, on its own connection.

    As on PostgreSQL, a failed statement ends the transaction's usefulness: it is marked
    failed and only ``rollback`` remains. ``commit``/``rollback`` always release the write
    gate and the connection."""

    def __init__(
        self,
        backend: SqliteBackend,
        threads: concurrent.futures.ThreadPoolExecutor,
        conn: sqlite3.Connection,
        state: _ConnState,
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
            self._loan = await self._backend._borrow_writer(self._interactive)
            if self.closed:  # ended while we waited
                self._loan.set()
                if self._interactive:
                    self._backend._writer_returned()
                self._check_usable()
            self._counted = self._interactive

        def run() -> T:
            if collection is not None and collection not in self._tables:
                self._execute(lambda conn: _create_table(conn, collection))
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
                    self._conn.execute(_AUDIT_INSERT, row)
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
            self._backend._writer_returned()

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
        self._backend._end_transaction(self._conn, self._state)
