"""The MongoDB backend (PyMongo's asyncio API): lifecycle, writes with their audit record in one
transaction, transactions, health, housekeeping and the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from pymongo import AsyncMongoClient, ReadPreference, WriteConcern
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.read_concern import ReadConcern

from proxy import context
from proxy.backends.base import Capabilities, TransactionShare, TxKind, Unsupported
from proxy.backends.mongo.coalesced import PointReads
from proxy.backends.mongo.describe import describe_collection as describe_one
from proxy.backends.mongo.describe import load_schemas as read_schemas
from proxy.backends.mongo.documents import AUDIT, IDEMPOTENCY, Op, T
from proxy.backends.mongo.errors import translate
from proxy.backends.mongo.migrations import MongoMigrations
from proxy.backends.mongo.reads import RoutedReads
from proxy.backends.mongo.routing import UNKNOWN_TOKEN, ReadRouting, note_write
from proxy.backends.mongo.transaction import MongoTransaction
from proxy.config import DatabaseConfig, Limits
from proxy.errors import BadRequest, DatabaseTimeout, NotFound, ProxyError, Unavailable
from proxy.ids import IdGenerator
from proxy.query import mongo as mq
from proxy.query.spec import AuditScope
from proxy.resilience.breaker import CircuitBreaker

log = logging.getLogger(__name__)

ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
DEFAULT_DATABASE = "dbproxy"
# how long past the statement timeout the client waits for a server that does not answer
GRACE_SECONDS = 0.5
SCHEMA_POLL_SECONDS = 1.0  # how soon a migration another sidecar ran is enforced
_AUDIT_FIELDS = ("id", "at", "service", "operation", "collection", "ids", "request_id", "outcome")


def database_of(url: str) -> str:
    """The database named by a ``mongodb://`` URL's path, else ``dbproxy``."""
    name = urlsplit(url).path.lstrip("/")
    return name or DEFAULT_DATABASE


def _sick(exc: PyMongoError) -> bool:
    """The endpoint is unavailable (what trips the breaker), not a refused request."""
    return isinstance(exc, ConnectionFailure | NetworkTimeout | ServerSelectionTimeoutError)


def _not_open() -> Unavailable:
    return Unavailable("the MongoDB backend is not connected", retry_after=1)


class MongoBackend(Unsupported, RoutedReads):
    """Documents in collections of the same name in one database: ``_id`` (string),
    ``_version``; ``_audit`` and ``_idempotency`` beside them."""

    capabilities = Capabilities(audit_log=True, coalesce=True, schemas=True, aggregate=True)

    def __init__(
        self,
        config: DatabaseConfig,
        limits: Limits,
        *,
        database: str | None = None,
        ids: IdGenerator | None = None,
        audit: bool = True,
        breaker: CircuitBreaker | None = None,
        coalesce: bool = True,
        primary_points: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(config.name, limits, ids or IdGenerator(), audit)
        # concurrent reads by id of one collection: one find over $in (coalesced.py)
        self._points = PointReads(self._query) if coalesce else None
        # the read preference of each operation (routing.py); by-id reads of the collections
        # the read cache fills (``primary_points``) stay on the primary
        self.routing = ReadRouting(config.read_preference, primary_points)
        self.config = config
        self.database = database or database_of(config.connection_string)
        self.client: AsyncMongoClient[Any] | None = None
        self._db: AsyncDatabase[Any] | None = None
        pool = config.pool_settings
        self._acquire_timeout = pool.timeout_seconds
        self.transaction_share = TransactionShare(max(1, pool.max_connections))
        self._open: set[MongoTransaction] = set()
        self.breaker = breaker or CircuitBreaker(f"{config.name}/primary")
        self.read_breaker = CircuitBreaker(f"{config.name}/secondary")

    # -- lifecycle -------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        pool = self.config.pool_settings
        timeout_ms = max(100, int(pool.timeout_seconds * 1000))
        options: dict[str, Any] = {
            "maxPoolSize": max(1, pool.max_connections),
            "minPoolSize": min(pool.min_connections, pool.max_connections),
            "serverSelectionTimeoutMS": timeout_ms,
            "connectTimeoutMS": timeout_ms,
            "waitQueueTimeoutMS": timeout_ms,
            "appname": "dbproxy",
            # a server that stops answering ends a wait soon after the statement timeout
            # (the server's own maxTimeMS, the same length, ends a slow statement first)
            "socketTimeoutMS": int((self.limits.statement_timeout_seconds + GRACE_SECONDS) * 1000),
            # the default is the primary: reads choose theirs per operation (routing.py)
            "read_preference": ReadPreference.PRIMARY,
        }
        wc = self.config.write_concern
        if wc is not None:
            options["w"] = wc
        return options

    async def start(self) -> None:
        # ``replicas`` add seeds to the URL's hosts: the driver discovers the set's members
        # and picks one per read by its read preference (routing.py)
        seeds = [f"{r.host}:{r.port}" for r in self.config.replicas]
        hosts = [self.config.connection_string, *seeds] if seeds else self.config.connection_string
        self.client = AsyncMongoClient(hosts, **self._client_options())
        self._db = self.client[self.database]
        try:
            await self._db.command("ping")
        except PyMongoError as exc:
            log.error("cannot reach MongoDB for %s: %s", self.name, type(exc).__name__)
            raise translate(exc) from None
        log.info("mongodb backend %s: database %s", self.name, self.database)

    async def close(self) -> None:
        for tx in list(self._open):
            await tx.rollback()
        client, self.client, self._db = self.client, None, None
        if client is not None:
            await client.close()

    @property
    def db(self) -> AsyncDatabase[Any]:
        if self._db is None:
            raise _not_open()
        return self._db

    async def health(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self._db is None:
            return {"status": "down", "error": "not_connected"}
        try:
            await asyncio.wait_for(self._db.command("ping"), 2.0)
        except (PyMongoError, TimeoutError) as exc:
            err = translate(exc) if isinstance(exc, PyMongoError) else _not_open()
            return {"status": "down", "error": err.code}
        return {
            "status": "up",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "engine": "mongodb",
            "breaker": self.breaker.snapshot(),
            "read_breaker": self.read_breaker.snapshot(),
            "routing": self.routing.snapshot(),
            "pool": {"max": self.config.pool_settings.max_connections},
        }

    async def maintain(self) -> None:
        """Periodic housekeeping: forget expired idempotency keys."""
        try:
            await self.db[IDEMPOTENCY].delete_many({"expires_at": {"$lt": time.time()}})
        except PyMongoError as exc:
            raise translate(exc) from None

    # -- running work ----------------------------------------------------------------

    async def _read(self, op: Op[T]) -> T:
        return await self._guarded(lambda: op(None), updating=False)

    async def _guarded(
        self,
        run: Callable[[], Awaitable[T]],
        *,
        updating: bool,
        breaker: CircuitBreaker | None = None,
    ) -> T:
        """``run`` behind the breaker (the primary's unless told): fails fast while the
        server is failing; only a network error or a timeout counts against it."""
        self.db  # noqa: B018 (raises when not connected)
        breaker = breaker or self.breaker
        if not breaker.allow():
            raise Unavailable(
                "the database is failing; its circuit breaker is open",
                code="database_unavailable",
                retry_after=max(1.0, breaker.retry_after()),
            )
        try:
            if updating:  # a write: one wait on the socket (its outcome must stay known)
                result = await run()
            else:  # a read ends by then, whatever the driver retries
                async with asyncio.timeout(self.limits.statement_timeout_seconds + GRACE_SECONDS):
                    result = await run()
        except asyncio.CancelledError:
            breaker.release()
            raise
        except TimeoutError:
            breaker.record_failure()
            raise DatabaseTimeout("the database did not answer within the deadline") from None
        except Exception as exc:
            err = translate(exc, committing=updating, updating=updating)
            if isinstance(exc, PyMongoError) and _sick(exc):
                breaker.record_failure()
            else:
                breaker.record_success()
            raise err from None
        breaker.record_success()
        return result

    async def _write(self, op: Op[T], audit: Callable[[T], list[str]] | None = None) -> T:
        """``op``; with the audit log on, in a transaction with its audit record (both or
        neither), retried on a transient transaction error."""
        if not self.audit:
            result = await self._guarded(lambda: op(None), updating=True)
            context.write_token.set(UNKNOWN_TOKEN)  # no session of ours: read the primary
            return result
        client = self.client
        if client is None:
            raise _not_open()
        deadline = time.monotonic() + self.limits.statement_timeout_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._guarded(lambda: self._in_transaction(client, op), updating=True)
            except ProxyError as exc:
                err = exc
            if err.code != "write_conflict" or time.monotonic() > deadline:
                raise err
            # another write holds the document: again after a short, spread wait
            await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))

    async def _in_transaction(self, client: AsyncMongoClient[Any], op: Op[T]) -> T:
        async with client.start_session() as session:
            await session.start_transaction(read_preference=ReadPreference.PRIMARY)
            try:
                result = await op(session)
            except BaseException:
                if session.in_transaction:
                    await asyncio.shield(self._abort(session))
                raise
            await self._commit(session)
            note_write(session.operation_time)  # the response's X-Consistency-Token
            return result

    @staticmethod
    async def _abort(session: AsyncClientSession) -> None:
        with contextlib.suppress(PyMongoError):
            await session.abort_transaction()

    @staticmethod
    async def _commit(session: AsyncClientSession) -> None:
        try:
            await session.commit_transaction()
        except PyMongoError as exc:
            if not exc.has_error_label("UnknownTransactionCommitResult"):
                raise
            await session.commit_transaction()  # commits may be retried

    async def _preview_update(self, collection: str, doc_id: str, change: Any, insert: bool) -> Any:
        """The document an update makes, computed by the database in a transaction that is
        then aborted."""
        client = self.client
        if client is None:
            raise _not_open()
        update = mq.compile_update(change.update)
        coll = self.db[collection]
        try:
            async with client.start_session() as session:
                await session.start_transaction()
                try:
                    flt: dict[str, Any] = {"_id": doc_id}
                    if insert:
                        flt["_version"] = {"$exists": False}
                    new = await coll.find_one_and_update(
                        flt, update, upsert=insert, return_document=True, session=session
                    )
                finally:
                    await asyncio.shield(self._abort(session))
        except PyMongoError as exc:
            raise translate(exc) from None
        if new is None:
            raise NotFound("no document with this _id", details={"_id": doc_id})
        new.pop("_version", None)
        return new

    # -- transactions ----------------------------------------------------------------

    async def begin(
        self, isolation: str = "read_committed", kind: TxKind = TxKind.SINGLE
    ) -> MongoTransaction:
        """A session with a transaction started on it (snapshot reads, majority writes:
        every isolation level runs as MongoDB's snapshot isolation)."""
        if isolation not in ISOLATION_LEVELS:
            raise BadRequest(
                f"isolation must be one of {', '.join(ISOLATION_LEVELS)}", code="invalid_isolation"
            )
        client = self.client
        if client is None:
            raise _not_open()
        share = self.transaction_share
        shared = await share.take(kind, self._acquire_timeout)
        options: dict[str, Any] = {
            "read_concern": ReadConcern("snapshot"),
            "write_concern": WriteConcern("majority"),
            "read_preference": ReadPreference.PRIMARY,  # MongoDB's rule for transactions
        }
        try:
            session = client.start_session()
            await session.start_transaction(**options)
        except BaseException as exc:
            if shared:
                share.give()
            if isinstance(exc, PyMongoError):
                raise translate(exc) from None
            raise

        def release() -> None:
            self._open.discard(tx)
            if shared:
                share.give()

        tx = MongoTransaction(
            self.name,
            self.limits,
            self.ids,
            self.audit,
            self.db,
            session,
            isolation,
            release,
            options,
        )
        self._open.add(tx)
        return tx

    # -- the audit log ---------------------------------------------------------------

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
        parts: list[dict[str, Any]] = []
        if service is not None:
            parts.append({"service": service})
        if collection is not None:
            parts.append({"collection": collection})
        if since is not None or until is not None:
            at: dict[str, float] = {}
            if since is not None:
                at["$gte"] = since
            if until is not None:
                at["$lt"] = until
            parts.append({"at": at})
        if after_id is not None:
            parts.append({"_id": {"$gt": after_id}})
        if scope is not None:
            visible: list[dict[str, Any]] = [{"collection": {"$in": list(scope.names)}}]
            visible += [{"collection": {"$regex": fnmatch.translate(g)}} for g in scope.globs]
            visible.append({"collection": "*", "service": scope.service})
            parts.append({"$or": visible})
        flt = {"$and": parts} if parts else {}

        async def run(session: Any) -> list[dict[str, Any]]:
            cur = self.db[AUDIT].find(flt, session=session).sort("_id", 1).limit(limit)
            return list(await cur.to_list())

        rows = await self._read(run)
        out = []
        for row in rows:
            row["id"] = row.pop("_id")
            out.append({k: row.get(k) for k in _AUDIT_FIELDS})
        return out

    # -- schemas and migrations (describe.py, migrations.py) ---------------------------

    async def load_schemas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        return await self._read(lambda _s: read_schemas(self.db))

    async def watch_schemas(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: a poll every ``SCHEMA_POLL_SECONDS`` (no change stream without
        a replica set's oplog being relied on)."""
        while True:
            try:
                await changed()
            except ProxyError as err:
                log.debug("schemas of %s not reloaded: %s", self.name, err.code)
            await asyncio.sleep(SCHEMA_POLL_SECONDS)

    async def describe_collection(self, collection: str, sample: int) -> dict[str, Any]:
        return await self._read(lambda _s: describe_one(self.db, collection, sample))

    def migrations(self) -> MongoMigrations:
        return MongoMigrations(self)

    async def collection_names(self) -> list[str]:
        names = await self._read(lambda s: self.db.list_collection_names(session=s))
        return sorted(n for n in names if not n.startswith("_"))
