"""One open MongoDB transaction: a client session with a transaction started on it, the
document operations inside it, commit and rollback, and idempotency keys claimed in it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from proxy import context
from proxy.backends.mongo.documents import IDEMPOTENCY, MongoDocuments, Op, T
from proxy.backends.mongo.errors import translate, write_conflict
from proxy.backends.mongo.routing import note_write
from proxy.config import Limits
from proxy.errors import CommitOutcomeUnknown, Conflict, NotFound, ProxyError
from proxy.ids import IdGenerator
from proxy.query import mongo as mq
from proxy.query.spec import StoredReply, check_fingerprint

PREVIEW = "_preview"  # the scratch collection an update inside a transaction is tried in


def _from_driver(exc: BaseException) -> bool:
    """An error the server answered (the server ends a transaction on any of them), even
    when our code re-raised it as a ProxyError."""
    return isinstance(exc, PyMongoError) or isinstance(exc.__context__, PyMongoError)


class MongoTransaction(MongoDocuments):
    """The document operations on one session inside an open transaction.

    As on PostgreSQL, an error the server answered ends the transaction (MongoDB aborts it):
    it is marked failed and only ``rollback`` remains."""

    in_transaction = True

    def __init__(
        self,
        name: str,
        limits: Limits,
        ids: IdGenerator,
        audit: bool,
        db: AsyncDatabase[Any],
        session: AsyncClientSession,
        isolation: str,
        release: Callable[[], None],
        options: dict[str, Any],
    ) -> None:
        super().__init__(name, limits, ids, audit)
        self._db = db
        self.session = session
        self.isolation = isolation
        self.failed: ProxyError | None = None
        self.closed = False
        self._release: Callable[[], None] | None = release
        self._options = options  # what the transaction was started with

    @property
    def db(self) -> AsyncDatabase[Any]:
        return self._db

    def _check_usable(self) -> None:
        if self.closed:
            raise Conflict("the transaction has already ended", code="transaction_closed")
        if self.failed is not None:
            raise Conflict(
                "an earlier statement failed; the transaction can only be rolled back",
                code="transaction_aborted",
            )

    async def _call(self, op: Op[T], updating: bool = False) -> T:
        self._check_usable()
        try:
            return await op(self.session)
        except Exception as exc:
            err = translate(exc, updating=updating)
            if _from_driver(exc):
                self.failed = err
            raise err from None

    async def _write(self, op: Op[T], audit: Callable[[T], list[str]] | None = None) -> T:
        return await self._call(op, updating=True)

    async def _read(self, op: Op[T]) -> T:
        return await self._call(op)

    async def _preview_update(self, collection: str, doc_id: str, change: Any, insert: bool) -> Any:
        """The document an update makes, as this transaction sees it. A session holds one
        transaction, so the update cannot be tried here and undone: the document as this
        transaction reads it is copied into a scratch collection inside a second
        transaction, the server applies the update there, and that one is aborted (nothing
        of it is ever stored, and this transaction's own writes are what the copy holds)."""
        found = await self._read(lambda s: self.db[collection].find_one({"_id": doc_id}, session=s))
        if found is None and not insert:
            raise NotFound("no document with this _id", details={"_id": doc_id})
        key = f"{doc_id}:{uuid.uuid4().hex}"
        scratch = self.db[PREVIEW]
        try:
            async with self.db.client.start_session() as session:
                await session.start_transaction()
                try:
                    if found is not None:
                        await scratch.insert_one({**found, "_id": key}, session=session)
                    new = await scratch.find_one_and_update(
                        {"_id": key},
                        mq.compile_update(change.update),
                        upsert=insert,
                        return_document=ReturnDocument.AFTER,
                        session=session,
                    )
                finally:
                    with contextlib.suppress(PyMongoError):
                        await asyncio.shield(session.abort_transaction())
        except PyMongoError as exc:
            raise translate(exc, updating=True) from None
        if new is None:  # the copy was made in this very transaction: not seen only if gone
            raise NotFound("no document with this _id", details={"_id": doc_id})
        new["_id"] = doc_id
        new.pop("_version", None)
        return new

    async def idem_claim(self, key: str, fingerprint: str, ttl: float) -> StoredReply | None:
        """Claim an idempotency key in this transaction, or return the reply stored for it.

        It is the transaction's first operation. A concurrent claim of the same key (an
        open transaction holds it: MongoDB answers a write conflict at once, it does not
        wait) starts this transaction again after a short wait, until the other one ended:
        its committed reply is returned here, or (rolled back) this one claims."""
        deadline = time.monotonic() + self.limits.statement_timeout_seconds
        attempt = 0
        while True:
            try:
                row = await self._call(self._claim(key, fingerprint, ttl), updating=True)
                break
            except Conflict as err:
                attempt += 1
                if err.code != "write_conflict" or time.monotonic() > deadline:
                    raise
            await self._restart()
            await asyncio.sleep(random.uniform(0.001, 0.002 * min(attempt, 25)))
        if row is None:
            return None
        check_fingerprint(row["fingerprint"], fingerprint)
        return StoredReply(int(row["status"]), bytes(row["body"]), dict(row["headers"]))

    def _claim(self, key: str, fingerprint: str, ttl: float) -> Op[Any]:
        coll = self.db[IDEMPOTENCY]
        now = time.time()
        fresh = {"fingerprint": fingerprint, "expires_at": now + ttl, "status": None}

        async def run(session: Any) -> Any:
            row = await coll.find_one({"_id": key}, session=session)
            if row is None:
                try:
                    await coll.insert_one({"_id": key, **fresh}, session=session)
                except DuplicateKeyError:  # claimed and committed since our snapshot
                    raise write_conflict() from None
                return None
            if row["expires_at"] < now:
                await coll.replace_one({"_id": key}, fresh, session=session)
                return None
            return row

        return run

    async def _restart(self) -> None:
        """Abort and start the transaction again on the same session (nothing was done in
        it but a claim that met another's)."""
        with contextlib.suppress(PyMongoError):
            if self.session.in_transaction:
                await self.session.abort_transaction()
        self.failed = None
        try:
            await self.session.start_transaction(**self._options)
        except PyMongoError as exc:
            self.failed = translate(exc)
            raise self.failed from None

    async def idem_save(self, key: str, reply: StoredReply) -> None:
        coll = self.db[IDEMPOTENCY]
        change = {"status": reply.status, "headers": reply.headers, "body": reply.body}
        await self._call(
            lambda session: coll.update_one({"_id": key}, {"$set": change}, session=session)
        )

    async def commit(self) -> None:
        """Commit (durable when it returns); the audit's commit record is part of it. A lost
        answer to the commit is retried once (commits are idempotent), then told as 502."""
        self._check_usable()
        if self.audit and self.wrote:
            ctx = context.current.get()
            await self._call(
                lambda s: self.audit_record(
                    s, ctx.service, "transaction_commit", "*", [], ctx.request_id
                )
            )
        self.closed = True
        await asyncio.shield(self._commit_and_end())
        note_write(self.session.operation_time)  # the commit's X-Consistency-Token

    async def _commit_and_end(self) -> None:
        try:
            for attempt in range(2):
                try:
                    await self.session.commit_transaction()
                    return
                except PyMongoError as exc:
                    unknown = exc.has_error_label("UnknownTransactionCommitResult")
                    if unknown and attempt == 0:
                        continue
                    if unknown:
                        raise CommitOutcomeUnknown(
                            "the database did not confirm the commit; the transaction may "
                            "or may not have been applied"
                        ) from None
                    raise translate(exc) from None
        finally:
            await self._end()

    async def rollback(self) -> None:
        """Abort and end the session; idempotent, shielded from cancellation."""
        if self.closed:
            return
        self.closed = True
        await asyncio.shield(self._abort_and_end())

    async def _abort_and_end(self) -> None:
        try:
            if self.session.in_transaction:
                with contextlib.suppress(PyMongoError):
                    await self.session.abort_transaction()
        finally:
            await self._end()

    async def _end(self) -> None:
        release, self._release = self._release, None
        try:
            with contextlib.suppress(PyMongoError):
                await self.session.end_session()
        finally:
            if release is not None:
                release()
